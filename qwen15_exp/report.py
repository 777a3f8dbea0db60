"""Report step: a sweep's result.json files -> sweep_report.md, .csv and .png in the sweep dir.

Per job: the published figure (where the job reproduces a table row), the estimate, the measurement (where
it ran), their ratios, and whether the memory estimate fits. A Hydra callback writes it at the end of every
multirun; `python -m qwen15_exp.report SWEEP_DIR` writes it again.
"""
from __future__ import annotations

import csv
import io
import statistics
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from qwen15_exp.atomic import atomic_path, write_text
from qwen15_exp.lifecycle import first_line, run_status
from qwen15_exp.ranks import spearman, tied_ranks
from qwen15_exp.result import fit_verdict
from qwen15_exp import run_files

COLUMNS = ["job", "experiment", "model", "phase", "parallel", "hardware", "status", "unit", "published",
           "estimated", "batch", "implied_batch", "measured", "est/pub", "meas/pub", "est/meas", "memory_gb",
           "budget_gb", "fits",
           "loss", "eval_loss", "perplexity", "failure_class", "reason"]


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def row_of(job: str, result: dict) -> dict:
    plan = result.get("plan") or {}
    est = plan.get("throughput") or {}
    measured = result.get("measured") or {}
    ref = result.get("reference") or {}
    train = est.get("kind", "train") == "train"
    unit = ref.get("unit") or ("tokens/s/p" if train else "tokens/s")
    measured = measured if isinstance(measured, dict) else {}
    per_device = unit.endswith("/p")
    estimated = est.get("tokens_per_s_per_device" if per_device else "tokens_per_s")
    got = measured.get("tokens_per_s_per_device" if per_device else "tokens_per_s")
    mem = plan.get("memory") or {}
    evals = measured.get("eval") or []
    eval_loss = evals[-1]["loss"] if evals else measured.get("eval_loss")
    perplexity = evals[-1]["PPL"] if evals else measured.get("perplexity")
    return {
        "job": job, "experiment": result.get("experiment"), "model": result.get("model"),
        "phase": result.get("phase"), "parallel": result.get("parallel"), "hardware": result.get("hardware"),
        "status": result.get("status"), "unit": unit, "published": ref.get("figure"),
        "estimated": round(estimated, 1) if estimated else None, "measured": round(got, 1) if got else None,
        "batch": est.get("batch") if not train else None,
        "implied_batch": est.get("implied_batch") if not train else None,
        "est/pub": _ratio(estimated, ref.get("figure")), "meas/pub": _ratio(got, ref.get("figure")),
        "est/meas": _ratio(estimated, got),
        "memory_gb": round(mem["total_gb"], 2) if mem else None,
        "budget_gb": mem.get("budget_gb"), "fits": fit_verdict(mem) if mem else None,
        "loss": round(measured["last_loss"], 4) if measured.get("last_loss") is not None else None,
        "eval_loss": round(eval_loss, 4) if eval_loss is not None else None,
        "perplexity": round(perplexity, 3) if perplexity is not None else None,
        # the curves for the plot (not columns)
        "_loss_curve": list(zip(measured.get("step_numbers") or [], measured.get("loss") or [])),
        "_eval_curve": [(e["step"], e["loss"]) for e in evals],
        "_rank_resolution": est.get("rank_resolution") or 0.0,
        "failure_class": result.get("failure_class") or ("killed" if result.get("status") == "killed" else None),
        "reason": result.get("reason") or (first_line(result.get("error", "")) or None),
    }


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job of the sweep that got as far as Hydra's job folder, in job order."""
    dirs = {p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/config.yaml")}
    dirs |= {p.parent for p in Path(sweep_dir).glob(f"*/{run_files.RESULT}")}
    return sorted(dirs, key=lambda d: (len(d.name), d.name))


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job; a job with no result (killed) or a dead `running` one says killed."""
    return [row_of(d.name, run_status(d)) for d in job_dirs(sweep_dir)]


def accuracy(rows: list[dict], key: str) -> dict | None:
    errors = [abs(r[key] - 1) for r in rows if r.get(key)]
    if not errors:
        return None
    return {"n": len(errors), "median_abs_error": statistics.median(errors), "worst_abs_error": max(errors)}


def ranking(rows: list[dict]) -> list[str]:
    """The measured jobs ranked by measurement, beside their estimated rank (a tuned sweep re-ranked)."""
    measured = [r for r in rows if r["measured"] and r["estimated"]]
    if len(measured) < 2:
        return []
    resolution = rank_resolution(measured)
    measured = sorted(measured, key=lambda r: -r["measured"])
    estimated_rank = tied_ranks([r["estimated"] for r in measured], resolution)
    out = ["", "Ranked by measurement:", "", "| rank | estimated rank | job | parallel | measured | estimated |",
           "|---|---|---|---|---|---|"]
    for i, (r, est_rank) in enumerate(zip(measured, estimated_rank), 1):
        out.append(f"| {i} | {est_rank} | {r['job']} | {r['parallel']} | {r['measured']} | {r['estimated']} |")
    rho = spearman([r["estimated"] for r in measured], [r["measured"] for r in measured], resolution)
    if rho is not None:
        out += ["", f"- Spearman rank correlation, estimated vs measured: {rho:.2f} over {len(measured)} jobs"
                + (f" (estimates within {resolution:.0%} of each other tie: '=')" if resolution else "")]
    return out


def rank_resolution(rows: list[dict]) -> float:
    """The coarsest rank resolution of the rows' hardware: the share below which estimates are not ordered."""
    return max((r.get("_rank_resolution") or 0.0 for r in rows), default=0.0)


def markdown(rows: list[dict], title: str) -> str:
    out = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join("" if r[c] is None else str(r[c]).replace("|", "/") for c in COLUMNS) + " |")
    out.append("")
    bad = not_ok(rows)
    if bad:
        out.append(f"- {len(bad)} of {len(rows)} jobs did not end ok: " + "; ".join(
            f"job {r['job']} {r['status']}" + (f" ({r['failure_class']})" if r["failure_class"] else "") for r in bad)
            + ". Run the same sweep again with hydra.sweep.dir=<this dir> to redo only those.")
    for key, what in (("est/pub", "estimate vs published"), ("est/meas", "estimate vs measured"),
                      ("meas/pub", "measured vs published")):
        for kind, subset in (("training", [r for r in rows if r["unit"].endswith("/p")]),
                             ("predict", [r for r in rows if not r["unit"].endswith("/p")])):
            acc = accuracy(subset, key)
            if acc:
                out.append(f"- {what}, {kind} rows: n={acc['n']}, median |ratio - 1| = "
                           f"{100 * acc['median_abs_error']:.1f} %, worst = {100 * acc['worst_abs_error']:.1f} %")
    out += ranking(rows)
    out += ["", "Estimates come from qwen15_exp/estimate (FLOPs, bytes and the hardware profile's few constants,",
            "calibrated on the Atlas 800T A2 training rows only). Predict estimates are made at the run's batch",
            "(`batch`: the recipe's phase.batch_size), a 256-token prompt and 256 new tokens. The published predict",
            "figures do not state their batch: `implied_batch` is the batch at which the estimate equals the",
            "published figure (empty: none up to 4096), what the figure means if the model is right; no batch is",
            "fitted per row.", ""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['job']}:{r['model']} {r['phase']}\n{r['parallel']}" for r in rows]
    series = [("published", "published", "#4c72b0"), ("estimated", "estimated", "#dd8452"),
              ("measured", "measured", "#55a868")]
    curves = any(r["_eval_curve"] for r in rows)
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(max(6, 0.9 * len(rows) + 2) + (6 if curves else 0), 4.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.27
    for i, (key, name, color) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ys = [r[key] or 0 for r in rows]
        if any(ys):
            ax.bar(xs, ys, width, label=name, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (per device for training)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    if curves:                             # training and eval loss of every job that evaluated
        lc = axes[0][1]
        for r in rows:
            if r["_eval_curve"]:
                line = lc.plot(*zip(*r["_loss_curve"]), lw=1, label=f"{r['job']} train") if r["_loss_curve"] else None
                color = line[0].get_color() if line else None
                lc.plot(*zip(*r["_eval_curve"]), "o--", color=color, label=f"{r['job']} eval")
        lc.set_xlabel("step")
        lc.set_ylabel("loss")
        lc.set_title("loss (eval: phase.eval)", fontsize=10)
        lc.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(sweep_dir: Path, title: str | None = None, rows: list[dict] | None = None) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    if not rows:
        return []
    title = title or f"qwen15_exp sweep {sweep_dir}"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = [write_text(sweep_dir / "sweep_report.md", markdown(rows, title)),
             write_text(sweep_dir / "sweep_report.csv", buf.getvalue())]
    plot(rows, sweep_dir / "sweep_report.png", title)
    return paths + [sweep_dir / "sweep_report.png"]


def sweep_title(config) -> str:
    """What the sweep is: its experiment file (`+experiment=table_900_a2_podc`), else its overrides."""
    hydra_cfg = config.get("hydra") or {}
    choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
    if choices.get("experiment"):
        return str(choices["experiment"])
    overrides = list((hydra_cfg.get("overrides") or {}).get("task") or [])
    return " ".join(overrides) or str(config.get("experiment_name", ""))


# The run dirs of the last sweep's jobs that did not end ok, from their result.json (read by __main__): the
# truth whatever ran them (this process, submitit's local processes or Slurm jobs on other nodes).
FAILED_JOBS: list[str] = []


def not_ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] not in ("ok", "planned")]


def write_k8s_index(sweep_dir: Path) -> Path | None:
    """submit_ascendjobs.sh: `kubectl apply -f` of every job's AscendJob (launch.k8s), in job order."""
    import shlex
    manifests = [run_status(d).get("k8s", {}).get("manifest") for d in job_dirs(sweep_dir)]
    manifests = [m for m in manifests if m]
    if not manifests:
        return None
    lines = ["#!/usr/bin/env bash", "# Submits this sweep's AscendJobs (one per job); watch with kubectl get ascendjob",
             "set -euo pipefail"] + [f"kubectl apply -f {shlex.quote(m)}" for m in manifests]
    return write_text(sweep_dir / "submit_ascendjobs.sh", "\n".join(lines) + "\n", mode=0o755)


def another_sweep(sweep_dir: Path, overrides: list[str]) -> list[str] | None:
    """The overrides of the sweep whose folder this is, when it is another sweep's (its jobs would mix into this
    one's report and exit status); None for a new folder or the same sweep run again (which continues it)."""
    import yaml
    previous = sweep_dir / "multirun.yaml"
    if not previous.is_file():
        return None
    try:
        theirs = list(yaml.safe_load(previous.read_text())["hydra"]["overrides"]["task"])
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    return None if sorted(theirs) == sorted(overrides) else theirs


class SweepReport(Callback):
    """Hydra callback: refuse a sweep folder that holds another sweep; write the sweep report when it ends."""

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        theirs = another_sweep(sweep_dir, list(config.hydra.overrides.task))
        if theirs is not None:
            print(f"error: hydra.sweep.dir={sweep_dir} holds another sweep ({' '.join(theirs) or 'no overrides'}); "
                  "its jobs would be reported as this one's. Choose another hydra.sweep.dir, or run that sweep's "
                  "own overrides to continue it", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        FAILED_JOBS[:] = [str(sweep_dir / r["job"]) for r in not_ok(rows)]
        title = sweep_title(config)
        paths = write_report(sweep_dir, title=f"qwen15_exp sweep: {title}", rows=rows)
        index = write_k8s_index(sweep_dir)
        if index:
            print(f"Kubernetes: every job's AscendJob is submitted by bash {index}")
        if paths:
            print(f"sweep report: {paths[0]}")
            print(paths[0].read_text())
        from qwen15_exp.tracking import sweep_ended
        sweep_ended(config, sweep_dir, title)


if __name__ == "__main__":
    for p in write_report(Path(sys.argv[1])):
        print(p)
