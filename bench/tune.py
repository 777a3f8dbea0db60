"""bench/tune: how fast the layout search is, and whether its ranking holds when the layouts really run.

1. Search time: 72B finetune at seq 8192 over 64 nodes (512 Atlas 900 A2 PoDc NPUs), global batch 512.
   Limit: 10 s on this machine (pure arithmetic, no MindSpore import).
2. Ranking: `python -m qwen15_exp.tune hardware=cpu tune.devices=2 tune.measure=true` for tiny and mini: the
   top layouts of each run here for a few steps; Spearman rank correlation between estimated and measured
   tokens/s over every measured job. Goal >= 0.8.

Usage: python bench/tune.py [--skip-measure] [--steps 8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from job import scratch
from qwen15_exp.ranks import spearman
from qwen15_exp.report import collect, rank_resolution


def search_time() -> None:
    with scratch("q15_tune_conf_") as conf:
        args = ["+experiment=recipe/finetune_72b", "hardware=atlas_900_a2_podc", "data.seq_length=8192",
                "tune.nodes=64", "tune.global_batch=512", f"tune.config_dir={conf}"]
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "qwen15_exp.tune", *args], capture_output=True, text=True,
                             check=True)
    wall = time.perf_counter() - t0
    searched = next(line for line in out.stdout.splitlines() if line.startswith("searched"))
    print(f"72B search, whole command: {wall:.2f} s (limit 10 s: {wall / 10:.2f}x of it)\n  {searched}")


def measured_rank(steps: int) -> None:
    with scratch("q15_tune_measure_") as outputs:
        env = {**os.environ, "QWEN15_EXP_OUTPUTS": str(outputs)}
        rows = []
        for model in ("tiny", "mini"):
            args = [f"model={model}", "hardware=cpu", "tune.devices=2", "tune.global_batch=8", "tune.top_k=3",
                    "tune.measure=true", f"tune.measure_steps={steps}", "phase.epochs=20",
                    f"tune.config_dir={outputs / 'conf'}"]
            print(f"\npython -m qwen15_exp.tune {' '.join(args)}", flush=True)
            out = subprocess.run([sys.executable, "-m", "qwen15_exp.tune", *args], capture_output=True, text=True, env=env)
            print(out.stdout[out.stdout.find("measuring"):] if "measuring" in out.stdout else out.stdout + out.stderr)
        for sweep in sorted((outputs / "tune").glob("*/*")):
            rows += [r for r in collect(sweep) if r["measured"] and r["estimated"]]
        resolution = rank_resolution(rows)
        rho = spearman([r["estimated"] for r in rows], [r["measured"] for r in rows], resolution)
        rho = rho if rho is None else round(rho, 9)          # 0.8 computed as 0.7999999999 is 0.8
        for r in rows:
            print(f"  {r['model']:<6}{r['parallel']:<22}estimated {r['estimated']:>8,.1f}  measured {r['measured']:>8,.1f}")
        print(f"\nSpearman rank correlation, estimated vs measured tokens/s/p over {len(rows)} measured jobs "
              f"(estimates within {resolution:.0%} of each other tie): {rho if rho is None else round(rho, 2)} "
              f"(goal >= 0.8: {'met' if rho and rho >= 0.8 else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-measure", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    search_time()
    if not args.skip_measure:
        measured_rank(args.steps)


if __name__ == "__main__":
    main()
