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
    bench = (result.get("benchmark") or {}).get("metrics") or {}
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
        # lm-eval's metrics (eval.tasks): a column each, and its standard error beside it
        "_bench": bench,
        **{name: round(m["value"], 4) for name, m in bench.items()},
        **{f"{name}_stderr": round(m["stderr"], 4) for name, m in bench.items() if m.get("stderr") is not None},
    }


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job of the sweep that got as far as Hydra's job folder, in job order."""
    dirs = {p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/config.yaml")}
    dirs |= {p.parent for p in Path(sweep_dir).glob(f"*/{run_files.RESULT}")}
    return sorted(dirs, key=lambda d: (len(d.name), d.name))


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job; a job with no result (killed) or a dead `running` one says killed."""
    rows = [row_of(d.name, run_status(d)) for d in job_dirs(sweep_dir)]
    for r, d in zip(rows, job_dirs(sweep_dir)):
        r["_overrides"] = job_overrides(d)
    names = column_names(swept_keys(rows))
    for r in rows:                        # a column per swept key (learning_rate, seed, ...)
        r.update({name: r["_overrides"].get(key) for key, name in names.items()})
        r["_swept"] = list(names.values())
    return rows


# what a sweep compares: lower is better for losses, higher for throughput (and any score)
LOWER_IS_BETTER = {"loss", "eval_loss", "perplexity"}
METRICS = ("eval_loss", "loss", "perplexity", "measured")
SEED_KEYS = ("phase.seed",)


def job_overrides(job_dir: Path) -> dict[str, str]:
    """key -> value of a job's own overrides (Hydra's .hydra/overrides.yaml), without hydra.* keys."""
    import yaml
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for item in items:
        key, eq, value = str(item).lstrip("+~").partition("=")
        if eq and not key.startswith("hydra"):
            out[key] = value
    return out


def swept_keys(rows: list[dict]) -> list[str]:
    """The override keys whose values differ between the jobs: what the sweep varies."""
    keys = sorted({k for r in rows for k in r["_overrides"]})
    return [k for k in keys if len({r["_overrides"].get(k) for r in rows}) > 1]


def column_names(keys: list[str]) -> dict[str, str]:
    """phase.lr_schedule.learning_rate -> learning_rate, unless two swept keys end alike."""
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    clash = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {k: (k if short[k] in clash else short[k]) for k in keys}


def benchmark_metrics(rows: list[dict]) -> list[str]:
    """lm-eval's metrics some job has, in the order the jobs report them."""
    return list(dict.fromkeys(name for r in rows for name in (r.get("_bench") or {})))


def lower_is_better(metric: str, rows: list[dict]) -> bool:
    """Losses and perplexities; for lm-eval's metrics, what its task says (higher_is_better)."""
    said = [(r.get("_bench") or {}).get(metric, {}).get("higher_is_better") for r in rows]
    said = [x for x in said if x is not None]
    return (not said[0]) if said else metric in LOWER_IS_BETTER or metric.endswith("perplexity")


def rank_metric(rows: list[dict], asked: str = "") -> str | None:
    if asked:
        return asked
    bench = benchmark_metrics(rows)
    if bench:                             # a benchmark sweep: its first task's first metric
        return bench[0]
    if any(r.get("eval_loss") is not None for r in rows):
        return "eval_loss"
    return None                           # throughput sweeps keep their ranking by measurement


def comparison(rows: list[dict], asked: str = "") -> list[str]:
    """The answer to what a sweep asks: one row per setting (the jobs that differ only by seed grouped, each
    metric as mean +- spread over them), best first by the ranking metric."""
    keys = [k for k in swept_keys(rows) if k not in SEED_KEYS]
    metric = rank_metric(rows, asked)
    if not keys or metric is None:
        return []
    names = column_names(keys)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault(tuple(r["_overrides"].get(k) for k in keys), []).append(r)
    if metric not in METRICS and not any(r.get(metric) is not None for r in rows):
        known = [m for m in (*METRICS, *benchmark_metrics(rows)) if any(r.get(m) is not None for r in rows)]
        return ["", f"(report.rank_by={metric}: no job has that metric; choose one of {', '.join(known or METRICS)})"]

    def stat(group, key):
        values = [r[key] for r in group if r.get(key) is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    lower = lower_is_better(metric, rows)
    ordered = sorted(groups.items(), key=lambda kv: (stat(kv[1], metric)[0] is None,
                                                     (1 if lower else -1) * (stat(kv[1], metric)[0] or 0)))
    shown = [m for m in (*METRICS, *benchmark_metrics(rows)) if any(r.get(m) is not None for r in rows)]

    def cell(group, m):
        mean, spread = stat(group, m)
        if mean is None:
            return ""
        if len(group) > 1:
            return f"{mean:.4g} +- {spread:.2g}"
        stderr = group[0].get(f"{m}_stderr")
        return f"{mean:.4g}" + (f" +- {stderr:.2g} se" if stderr is not None else "")
    out = ["", f"Settings ranked by {metric} ({'lower' if lower else 'higher'} is better; mean +- standard deviation "
               "over the jobs that differ only by seed; for one job, lm-eval's standard error `se`):", "",
           "| rank | " + " | ".join(names[k] for k in keys) + " | jobs | " + " | ".join(shown) + " |",
           "|---|" + "---|" * (len(keys) + 1 + len(shown))]
    for i, (values, group) in enumerate(ordered, 1):
        cells = [cell(group, m) for m in shown]
        out.append(f"| {i} | " + " | ".join(str(v) for v in values) + f" | {','.join(r['job'] for r in group)} | "
                   + " | ".join(cells) + " |")
    return out


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


def columns_of(rows: list[dict]) -> list[str]:
    """The report's columns: the job, then the swept keys, then the rest, then lm-eval's metrics (each with its
    standard error)."""
    swept = rows[0].get("_swept", []) if rows else []
    bench = [c for m in benchmark_metrics(rows) for c in (m, f"{m}_stderr") if any(r.get(c) is not None for r in rows)]
    return COLUMNS[:1] + swept + [c for c in COLUMNS[1:] if c not in swept] + bench


def markdown(rows: list[dict], title: str, rank_by: str = "") -> str:
    columns = columns_of(rows)
    out = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(c) is None else str(r[c]).replace("|", "/") for c in columns) + " |")
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
    out += comparison(rows, rank_by)
    out += ranking(rows)
    out += ["", "Estimates come from qwen15_exp/estimate (FLOPs, bytes and the hardware profile's few constants,",
            "calibrated on the Atlas 800T A2 training rows only). Predict estimates are made at the run's batch",
            "(`batch`: the recipe's phase.batch_size), a 256-token prompt and 256 new tokens. The published predict",
            "figures do not state their batch: `implied_batch` is the batch at which the estimate equals the",
            "published figure (empty: none up to 4096), what the figure means if the model is right; no batch is",
            "fitted per row.", ""]
    return "\n".join(out)


def job_label(r: dict) -> str:
    """A job as its swept values ("2: learning_rate=0.002 seed=1"), else its model, phase and layout."""
    swept = r.get("_swept") or []
    if swept:
        return f"{r['job']}: " + " ".join(f"{k}={r.get(k)}" for k in swept)
    return f"{r['job']}: {r['model']} {r['phase']} {r['parallel']}"


def plot(rows: list[dict], path: Path, title: str, rank_by: str = "") -> None:
    """Throughput bars (published, estimated, measured); the loss curves of jobs that evaluated; and, for a
    sweep over settings, the ranking metric against the first swept key (each job a point, the mean a line)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [job_label(r) for r in rows]
    series = [("published", "published", "#4c72b0"), ("estimated", "estimated", "#dd8452"),
              ("measured", "measured", "#55a868")]
    curves = any(r["_eval_curve"] for r in rows)
    keys = [k for k in (rows[0].get("_swept") or []) if k != "seed"]
    metric = rank_metric(rows, rank_by)
    versus = bool(keys) and metric is not None and any(r.get(metric) is not None for r in rows)
    panels = 1 + curves + versus
    fig, axes = plt.subplots(1, panels, figsize=(max(6, 0.9 * len(rows) + 2) + 6 * (panels - 1), 5), squeeze=False)
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
    ax.set_title("throughput", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    panel = 1
    if curves:                             # training and eval loss of every job that evaluated
        lc = axes[0][panel]
        panel += 1
        for r, label in zip(rows, labels):
            if r["_eval_curve"]:
                line = lc.plot(*zip(*r["_loss_curve"]), lw=1, label=f"{label} (train)") if r["_loss_curve"] else None
                color = line[0].get_color() if line else None
                lc.plot(*zip(*r["_eval_curve"]), "o--", color=color, label=f"{label} (eval)")
        lc.set_xlabel("step")
        lc.set_ylabel("loss")
        lc.set_title("loss (eval: phase.eval)", fontsize=10)
        lc.legend(fontsize=7)
    if versus:                             # the metric against the swept setting
        vc, key = axes[0][panel], keys[0]
        values = sorted({str(r.get(key)) for r in rows}, key=lambda v: (_as_number(v) is None, _as_number(v) or 0, v))
        for r in rows:
            if r.get(metric) is not None:
                vc.errorbar(values.index(str(r.get(key))), r[metric], yerr=r.get(f"{metric}_stderr"), fmt="o",
                            alpha=0.6, capsize=3, label=job_label(r))
        means = [statistics.fmean([r[metric] for r in rows if str(r.get(key)) == v and r.get(metric) is not None]
                                  or [float("nan")]) for v in values]
        vc.plot(range(len(values)), means, "k-", lw=1, label="mean over seeds")
        vc.set_xticks(range(len(values)))
        vc.set_xticklabels([textwrap.shorten(f"{key}={v}", 40, placeholder="...") if len(v) < 40 else
                            f"{key}=...{v[-30:]}" for v in values], fontsize=8, rotation=10)
        vc.set_ylabel(metric)
        vc.set_title(f"{metric} by {key}", fontsize=10)
        vc.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _as_number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def write_report(sweep_dir: Path, title: str | None = None, rows: list[dict] | None = None,
                 rank_by: str = "") -> list[Path]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    if not rows:
        return []
    title = title or f"qwen15_exp sweep {sweep_dir}"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns_of(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = [write_text(sweep_dir / "sweep_report.md", markdown(rows, title, rank_by)),
             write_text(sweep_dir / "sweep_report.csv", buf.getvalue())]
    plot(rows, sweep_dir / "sweep_report.png", title, rank_by)
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
        rank_by = str(config.get("report", {}).get("rank_by") or "")
        paths = write_report(sweep_dir, title=f"qwen15_exp sweep: {title}", rows=rows, rank_by=rank_by)
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
