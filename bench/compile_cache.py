"""bench/compile_cache: time to the first step with MindSpore's compile cache cold (emptied) vs warm.

Runs the tiny default job `--reps` times cold (its compile cache folder removed first) and `--reps` times warm,
alternating, each in a fresh process, and prints from each run's result.json the time from the process start
to the end of step 1, and the first step alone (graph compile + one step), as medians with the warm/cold ratio.
Goal: warm <= 50 % of cold.

Usage: python bench/compile_cache.py [--reps 3] [--steps 3] [overrides ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
from pathlib import Path

from job import run_job, scratch


def run_once(work: Path, name: str, env: dict, steps: int, overrides: list[str]) -> dict:
    result = run_job(work, name, env, steps, overrides)
    m = result["measured"]
    return {"to_first_step_s": m["time_to_first_step_s"], "first_step_s": m["step_times_s"][0],
            "cache": result["compile_cache"]["use"], "dir": result["compile_cache"]["dir"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with scratch("q15_compile_cache_") as work:
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
        print(f"preparing data and the CPU calibration once, in {work}", flush=True)
        first = run_once(work, "prep", env, args.steps, args.overrides)
        cold, warm = [], []
        for i in range(args.reps):
            shutil.rmtree(first["dir"], ignore_errors=True)
            cold.append(run_once(work, f"cold{i}", env, args.steps, args.overrides))
            warm.append(run_once(work, f"warm{i}", env, args.steps, args.overrides))
            print(f"rep {i}: cold {cold[-1]['to_first_step_s']:.2f} s ({cold[-1]['cache']}), "
                  f"warm {warm[-1]['to_first_step_s']:.2f} s ({warm[-1]['cache']})", flush=True)
        assert all(r["cache"] == "compiled and cached" for r in cold), cold
        assert all(r["cache"] == "reused" for r in warm), warm

        print(f"\nbench/compile_cache: {' '.join(args.overrides) or 'default job'}, median of {args.reps} runs each")
        print(f"{'figure':<36}{'cold':>8}{'warm':>8}{'warm/cold':>11}")
        ratios = {}
        for key, label in (("to_first_step_s", "process start -> end of step 1 (s)"),
                           ("first_step_s", "step 1 alone: compile + step (s)")):
            c, w = statistics.median(r[key] for r in cold), statistics.median(r[key] for r in warm)
            ratios[key] = w / c
            print(f"{label:<36}{c:>8.2f}{w:>8.2f}{w / c:>11.3f}")
        for key, label in (("to_first_step_s", "time to first step"), ("first_step_s", "step 1 alone")):
            print(f"goal warm <= 50 % of cold, {label}: {'met' if ratios[key] <= 0.5 else 'NOT met'} "
                  f"({ratios[key]:.0%})")


if __name__ == "__main__":
    main()
