"""bench/estimate: how close the throughput estimates come to published and measured figures.

1. Calibration: the Atlas 800T A2 training rows (the only rows the constants were fitted on).
2. Validation: the six Atlas 900 A2 PoDc training rows. Goal: median |estimate/published - 1| <= 10 %,
   worst <= 25 %.
3. Predict rows of the 800T A2 table, reported with their assumption (batch 1).
4. A CPU sweep measured here: tiny and mini x single and dp2, `phase.max_steps` steps each. Goal: median
   |estimate/measured - 1| <= 25 %. (The CPU constants were fitted on jobs like these: conf/hardware/cpu.yaml.)

With --fit: fit compute_efficiency, attention_efficiency and comm_overlap again on the 800T A2 training rows
(a grid, least squares of log ratios) and show both tables with the fitted values.

Usage: python bench/estimate.py [--fit] [--skip-cpu] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from hydra import compose, initialize_config_dir

from job import scratch
from qwen15_exp.compose import conf_dir, group_options, register, to_experiment
from qwen15_exp.estimate.throughput import estimate_throughput


FITTED: dict = {}          # constants from --fit, applied to every row


def fit() -> dict:
    """Grid search of the three fitted constants on the 800T A2 training rows."""
    import itertools
    import math
    rows = [exp for exp in table_experiments("800t_a2") if exp.phase.trains]
    grid = itertools.product([x / 100 for x in range(30, 91)], [x / 20 for x in range(4, 21)],
                             [x / 10 for x in range(0, 10)])
    best = None
    for ce, ae, co in grid:
        consts = {"compute_efficiency": ce, "attention_efficiency": ae, "comm_overlap": co}
        err = 0.0
        for exp in rows:
            exp.hardware.estimate = {**exp.hardware.estimate, **consts}
            err += math.log(estimate_throughput(exp).tokens_per_s_per_device / exp.reference["figure"]) ** 2
        if best is None or err < best[0]:
            best = (err, consts)
    return best[1]


def table_experiments(table: str):
    out = []
    for row in group_options(f"table/{table}"):
        overrides = [f"+table={table}/{row}"]
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            exp = to_experiment(compose(config_name="config", overrides=overrides), overrides=overrides)
        exp.hardware.estimate = {**exp.hardware.estimate, **FITTED}
        out.append(exp)
    return out


def table_rows(table: str):
    out = []
    for row, exp in zip(group_options(f"table/{table}"), table_experiments(table)):
        est = estimate_throughput(exp)
        per_device = exp.reference["unit"].endswith("/p")
        figure = est.tokens_per_s_per_device if per_device else est.tokens_per_s
        out.append((row, exp.reference["figure"], figure, exp.reference["unit"], est.assumptions))
    return out


def show(title: str, rows, goal: tuple[float, float] | None = None) -> None:
    print(f"\n{title}")
    print(f"  {'row':<22}{'published':>11}{'estimate':>11}{'ratio':>8}  unit")
    errors = []
    for row, pub, est, unit, _ in rows:
        errors.append(abs(est / pub - 1))
        print(f"  {row:<22}{pub:>11,.0f}{est:>11,.0f}{est / pub:>8.2f}  {unit}")
    med, worst = statistics.median(errors), max(errors)
    line = f"  median |ratio - 1| = {100 * med:.1f} %, worst = {100 * worst:.1f} %"
    if goal:
        line += f"  (goal <= {100 * goal[0]:.0f} % / {100 * goal[1]:.0f} %: " \
                f"{'met' if med <= goal[0] and worst <= goal[1] else 'NOT met'})"
    print(line)


def cpu_sweep(steps: int) -> None:
    with scratch("q15_cpu_sweep_") as work:
        cmd = [sys.executable, "-m", "qwen15_exp", "-m", "model=tiny,mini", "parallel=single,dp2", "hardware=cpu",
               f"phase.max_steps={steps}", f"hydra.sweep.dir={work}"]
        print(f"\nCPU sweep (real runs): {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
        errors = []
        print(f"  {'job':<18}{'measured':>11}{'estimate':>11}{'ratio':>8}  tokens/s (whole job)")
        for path in sorted(work.glob("*/result.json")):
            r = json.loads(path.read_text())
            meas, est = r["measured"]["tokens_per_s"], r["plan"]["throughput"]["tokens_per_s"]
            errors.append(abs(est / meas - 1))
            print(f"  {r['model'] + ' ' + r['parallel']:<18}{meas:>11,.0f}{est:>11,.0f}{est / meas:>8.2f}")
        med = statistics.median(errors)
        print(f"  median |estimate/measured - 1| = {100 * med:.1f} %, worst = {100 * max(errors):.1f} % "
              f"(goal median <= 25 %: {'met' if med <= 0.25 else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fit", action="store_true")
    args = ap.parse_args()
    register()
    if args.fit:
        FITTED.update(fit())
        print("fitted on the 800T A2 training rows: " + ", ".join(f"{k} {v}" for k, v in FITTED.items()))
    r800 = table_rows("800t_a2")
    show("calibration rows: Atlas 800T A2 training", [r for r in r800 if r[3].endswith("/p")])
    show("validation rows: Atlas 900 A2 PoDc training", table_rows("900_a2_podc"), goal=(0.10, 0.25))
    predict = [r for r in r800 if not r[3].endswith("/p")]
    show(f"predict rows: Atlas 800T A2 (assumed: {predict[0][4]})", predict)
    if not args.skip_cpu:
        cpu_sweep(args.steps)


if __name__ == "__main__":
    main()
