"""Measure this machine's CPU for the `cpu` hardware profile: fp32 matmul rate and memory bandwidth.

    python -m qwen15_exp.estimate.cpu_calibration        # measure again and print

The profile reads the figures through resolvers (`${q15.cpu_tflops:}`, `${q15.cpu_bandwidth_gbs:}`); they
are measured once (the median of 7 short matmul bursts and 7 copies of 128 MB, about a second, numpy's BLAS on
every core) and cached in <cache root>/cpu_calibration.json (qwen15_exp/paths.py), keyed by CPU model and
core count; a run whose measurement is off the estimate by more than 2x drops the cache.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from qwen15_exp.paths import cache_root


def cache_file() -> Path:
    return cache_root() / "cpu_calibration.json"


def machine_key() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    return f"{model}|{os.cpu_count()}"


REPEATS = 7


def measure() -> dict:
    """The median of REPEATS short bursts of each (a single burst swings 2x with what else the machine does),
    with numpy's BLAS on every core as MindSpore's CPU kernels are."""
    import statistics

    import numpy as np
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    a @ b                                           # warm-up (thread pool, caches)
    rates = []
    for _ in range(REPEATS):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.08:
            a @ b
            reps += 1
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    src = np.ones(16 * 2**20, dtype=np.float64)     # 128 MB
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copies = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copies.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)   # read + write
    return {"key": machine_key(), "fp32_tflops": round(statistics.median(rates) / 1000, 4),
            "bandwidth_gbs": round(statistics.median(copies), 2), "repeats": REPEATS}


def check_against_run(estimated: float, measured: float) -> str | None:
    """After a CPU run: when the estimate is off by more than 2x the cached figures are not this machine's
    any more (another load when they were measured, a changed VM): drop them so that the next run measures
    again, and say so."""
    if not estimated or not measured or 0.5 <= measured / estimated <= 2.0:
        return None
    cache_file().unlink(missing_ok=True)
    return (f"the CPU estimate ({estimated:,.0f} tokens/s) was {measured / estimated:.1f}x the measurement: the "
            "calibration is measured again on the next run")


def load(refresh: bool = False) -> dict:
    path = cache_file()
    if not refresh and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == machine_key():
                return cached
        except (OSError, ValueError):
            pass
    figures = measure()
    from qwen15_exp.atomic import write_json
    try:
        write_json(path, figures)
    except OSError:
        pass                                        # a read-only home still gets the figures
    return figures


def main() -> None:
    f = load(refresh=True)
    print(f"cpu: {f['key']}\n  fp32 matmul {f['fp32_tflops'] * 1000:.1f} GFLOP/s   memory {f['bandwidth_gbs']:.1f} GB/s"
          f"\n  cached in {cache_file()}")


if __name__ == "__main__":
    main()
