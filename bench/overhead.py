"""bench/overhead: what qwen15_exp costs on top of MindFormers for the same mindformers.yaml.

Runs the tiny default job through `python -m qwen15_exp` and the YAML that run wrote through MindFormers'
API directly (bench/mindformers_alone.py), alternating, and measures both the same way from outside:
wall time of the process, time from process start to the end of step 1 (the first MFLossMonitor line),
and steady tokens/s from MindFormers' own per_step_time (median over steps 2..N).
Goal: wall time within 5 % and tokens/s at least 98 % of MindFormers alone.

Usage: python bench/overhead.py [--steps 40] [--reps 2]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from job import scratch

HERE = Path(__file__).resolve().parent
STEP_LINE = re.compile(r"step:\[\s*(\d+)/\s*\d+\].*?per_step_time: (\d+)ms")


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, step_ms = None, {}
    for line in proc.stdout:
        m = STEP_LINE.search(line)
        if m:
            step = int(m.group(1))
            step_ms[step] = int(m.group(2))
            if step == 1 and first_step is None:
                first_step = time.perf_counter() - t0
    rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"{cmd} failed with exit code {rc}")
    wall = time.perf_counter() - t0
    steady = [ms for s, ms in step_ms.items() if s >= 2]
    return {"wall_s": wall, "first_step_s": first_step, "steady_ms": statistics.median(steady), "steps": len(step_ms)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with scratch("q15_overhead_") as work:
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
        # verbose=true: MindFormers' per-step lines on stdout, as MindFormers alone prints them (the figures read)
        ours_cmd = lambda d: [sys.executable, "-m", "qwen15_exp", f"phase.max_steps={args.steps}",  # noqa: E731
                              f"hydra.run.dir={d}", "verbose=true"]
        print(f"warm-up run (prepares and caches the data, writes the YAML) in {work}", flush=True)
        timed(ours_cmd(work / "warm"), work, env)
        yaml_path = work / "warm" / "mindformers.yaml"
        # MindFormers alone gets the run's environment too (the compile cache among it): overhead, not features
        import json
        alone_env = {**env, **json.loads((work / "warm" / "plan.json").read_text())["env"]}
        tokens_per_step = 128 * 1                       # tiny default: seq_length 128, batch 1
        ours, alone = [], []
        for i in range(args.reps):
            ours.append(timed(ours_cmd(work / f"ours{i}"), work, env))
            alone.append(timed([sys.executable, str(HERE / "mindformers_alone.py"), str(yaml_path),
                                str(work / f"alone{i}")], work, alone_env))
            print(f"rep {i}: qwen15_exp {ours[-1]}  mindformers {alone[-1]}", flush=True)

        def med(runs, key):
            return statistics.median(r[key] for r in runs)

        rows = [("wall time (s)", med(ours, "wall_s"), med(alone, "wall_s")),
                ("time to first step (s)", med(ours, "first_step_s"), med(alone, "first_step_s")),
                ("steady tokens/s", tokens_per_step * 1000 / med(ours, "steady_ms"),
                 tokens_per_step * 1000 / med(alone, "steady_ms"))]
        print(f"\nbench/overhead: tiny model, {args.steps} steps, median of {args.reps} runs each")
        print(f"{'figure':<24}{'qwen15_exp':>12}{'MindFormers':>13}{'ratio':>8}")
        for name, a, b in rows:
            print(f"{name:<24}{a:>12.2f}{b:>13.2f}{a / b:>8.3f}")
        wall_ratio, tps_ratio = rows[0][1] / rows[0][2], rows[2][1] / rows[2][2]
        print(f"goal: wall ratio <= 1.05 -> {'met' if wall_ratio <= 1.05 else 'NOT met'} ({wall_ratio:.3f}); "
              f"tokens/s ratio >= 0.98 -> {'met' if tps_ratio >= 0.98 else 'NOT met'} ({tps_ratio:.3f})")


if __name__ == "__main__":
    main()
