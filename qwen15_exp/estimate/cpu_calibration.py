"""Measure this machine's CPU for the `cpu` hardware profile: fp32 matmul rate and memory bandwidth.

    python -m qwen15_exp.estimate.cpu_calibration        # measure again and print

The profile reads the figures through resolvers (`${q15.cpu_tflops:}`, `${q15.cpu_bandwidth_gbs:}`); they
are measured once (the best of 7 short matmul bursts and of 7 copies of 128 MB, about a second, numpy's BLAS
on every core) and cached in <cache root>/cpu_calibration.json (qwen15_exp/paths.py), keyed by CPU model and
core count.

A calibration taken while the machine was busy makes every later estimate low, so it is checked against
every CPU run long enough to judge: when the run's measurement and the estimate disagree by more than the
estimate's stated uncertainty, the figures are measured again right after the run (the machine as the run
had it) and kept if they differ, and the summary says the calibration was stale.
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
    """The best of REPEATS short bursts of each, with numpy's BLAS on every core as MindSpore's CPU kernels
    are. A single burst swings 2x with what else the machine does; the best one is the machine at its quietest
    moment in that second, which is what a run that has the machine to itself gets."""
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
    return {"key": machine_key(), "fp32_tflops": round(max(rates) / 1000, 4),
            "bandwidth_gbs": round(max(copies), 2), "repeats": REPEATS, "measured_unix": round(time.time())}


def check_against_run(estimated: float, measured: float, uncertainty: float) -> dict | None:
    """After a CPU run: an estimate off the measurement by more than its stated uncertainty means the cached
    figures are stale (measured while the machine was busy, or a changed VM). Measure again now and keep the new
    figures when they differ by more than a burst's own spread (5 %). Returns what happened, for result.json
    and the summary, or None when the estimate held."""
    if not estimated or not measured or abs(measured / estimated - 1) <= uncertainty:
        return None
    old = load()
    new = measure()
    changed = any(abs(new[k] / old[k] - 1) > 0.05 for k in ("fp32_tflops", "bandwidth_gbs") if old.get(k))
    if changed:
        save(new)
    return {"stale": True, "estimated_tokens_per_s": round(estimated, 1), "measured_tokens_per_s": round(measured, 1),
            "uncertainty": uncertainty, "remeasured": changed,
            "old": {k: old.get(k) for k in ("fp32_tflops", "bandwidth_gbs")},
            "new": {k: new[k] for k in ("fp32_tflops", "bandwidth_gbs")}}


def note_of(check: dict) -> str:
    """One line for the summary."""
    ratio = check["measured_tokens_per_s"] / check["estimated_tokens_per_s"]
    head = (f"the CPU estimate's calibration was stale: the run measured {ratio:.2f}x the estimate (beyond its "
            f"+-{check['uncertainty']:.0%})")
    old, new = check["old"], check["new"]
    if not check["remeasured"]:
        return head + "; measured again, the machine's figures are unchanged (the run shared the machine)"
    return (head + f"; measured again: fp32 {old['fp32_tflops'] * 1000:.1f} -> {new['fp32_tflops'] * 1000:.1f} "
            f"GFLOP/s, memory {old['bandwidth_gbs']:.1f} -> {new['bandwidth_gbs']:.1f} GB/s; the next run's "
            "estimate uses them")


def save(figures: dict) -> None:
    from qwen15_exp.atomic import write_json
    try:
        write_json(cache_file(), figures)
    except OSError:
        pass                                        # a read-only cache still gets the figures for this process


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
    save(figures)
    return figures


def main() -> None:
    f = load(refresh=True)
    print(f"cpu: {f['key']}\n  fp32 matmul {f['fp32_tflops'] * 1000:.1f} GFLOP/s   memory {f['bandwidth_gbs']:.1f} GB/s"
          f"\n  cached in {cache_file()}")


if __name__ == "__main__":
    main()
