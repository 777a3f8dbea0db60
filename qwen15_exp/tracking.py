"""Tracking: each job of a run or sweep as an MLflow run (`+tracking=mlflow`), from its result.json.

A Hydra callback, so it works whatever launches the jobs: `on_job_end` runs in the job's own process (this
one, submitit's or a Slurm node's) and logs the job; `on_multirun_end` logs the sweep as a parent run that
holds the sweep report and adopts its jobs. What is logged comes from the run dir (result.json and the files
beside it), never from memory, so a failed or killed job is logged as what it is.

Store: `tracking.uri`, else MLFLOW_TRACKING_URI, else a local SQLite store under <output root>/mlruns
(MLflow 3 refuses its old plain-folder store).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from qwen15_exp.lifecycle import run_status
from qwen15_exp import run_files

ARTIFACTS = (run_files.MINDFORMERS_YAML, run_files.PLAN, run_files.RESULT)
SWEEP_ARTIFACTS = ("sweep_report.md", "sweep_report.csv", "sweep_report.png")
PARAM_VALUE_MAX = 6000            # MLflow's limit on a parameter's value
BATCH, METRIC_BATCH = 100, 1000   # MLflow's limits on params and metrics per log_batch call


def local_store(output_root: str | Path) -> tuple[str, str]:
    """The default store: a SQLite file and an artifact folder, both under <output root>/mlruns."""
    root = Path(output_root) / "mlruns"
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (cut at MLflow's limit)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            out[name] = text[:PARAM_VALUE_MAX]
    return out


def step_metrics(result: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) for every training step and evaluation of a result."""
    measured = result.get("measured") if isinstance(result.get("measured"), dict) else {}
    rows = [("loss", float(v), int(s)) for s, v in zip(measured.get("step_numbers") or [],
                                                        measured.get("loss") or [])]
    for e in measured.get("eval") or []:
        rows.append(("eval_loss", float(e["loss"]), int(e["step"])))
        if e.get("PPL") is not None:
            rows.append(("eval_perplexity", float(e["PPL"]), int(e["step"])))
    return rows


def summary_metrics(result: dict) -> dict[str, float]:
    """Estimate vs measurement, and the run's own figures, as single-valued metrics."""
    plan = result.get("plan") or {}
    est = plan.get("throughput") or {}
    measured = result.get("measured") if isinstance(result.get("measured"), dict) else {}
    mem = plan.get("memory") or {}
    out = {
        "estimated_tokens_per_s": est.get("tokens_per_s"),
        "estimated_tokens_per_s_per_device": est.get("tokens_per_s_per_device"),
        "estimated_memory_gb": mem.get("total_gb"),
        "memory_budget_gb": mem.get("budget_gb"),
        "tokens_per_s": measured.get("tokens_per_s"),
        "tokens_per_s_per_device": measured.get("tokens_per_s_per_device"),
        "time_to_first_step_s": measured.get("time_to_first_step_s"),
        "peak_rss_mb": measured.get("peak_rss_mb"),
        "wall_time_s": result.get("wall_time_s"),
        "params_total": plan.get("params_total"),
        "params_trainable": plan.get("params_trainable"),
    }
    if out["estimated_tokens_per_s"] and out["tokens_per_s"]:
        out["estimate_over_measured"] = out["estimated_tokens_per_s"] / out["tokens_per_s"]
    out.update(benchmark_metrics(result))
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def benchmark_metrics(result: dict) -> dict:
    """lm-eval's metrics as `<task>/<metric>` and `<task>/<metric>_stderr` (MLflow allows no comma: a filter
    name follows a dot, "gsm8k/exact_match.strict-match")."""
    out = {}
    for name, m in ((result.get("benchmark") or {}).get("metrics") or {}).items():
        key = name.replace(",", ".")
        out[key] = m.get("value")
        out[f"{key}_stderr"] = m.get("stderr")
    return out


def _open(tracking: dict, output_root: str, experiment: str):
    """(client, experiment id) of the store the config names; the experiment is created when missing."""
    from mlflow import MlflowClient
    uri = tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    artifacts = None
    if not uri:
        uri, artifacts = local_store(output_root)
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return client, found.experiment_id
    try:
        return client, client.create_experiment(experiment, artifact_location=artifacts)
    except Exception:                  # another job of the sweep created it first
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return client, found.experiment_id


def _log_files(client, run_id: str, folder: Path, names: tuple) -> None:
    for name in names:
        if (folder / name).is_file():
            client.log_artifact(run_id, str(folder / name))


def _log_batch(client, run_id: str, params: dict[str, str] = None, metrics: list = ()) -> None:
    from mlflow.entities import Metric, Param
    now = int(time.time() * 1000)
    items = [Param(k, v) for k, v in (params or {}).items()]
    for i in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[i:i + BATCH])
    entries = [Metric(k, v, now, s) for k, v, s in metrics]
    for i in range(0, len(entries), METRIC_BATCH):
        client.log_batch(run_id, metrics=entries[i:i + METRIC_BATCH])


MLFLOW_STATUS = {"ok": "FINISHED", "planned": "FINISHED", "killed": "KILLED", "interrupted": "KILLED"}


def log_job(tracking: dict, output_root: str, experiment: str, run_dir: Path, config: dict,
            sweep_dir: str | None, job: str | None) -> str:
    """One job's MLflow run; returns its run id."""
    client, exp_id = _open(tracking, output_root, experiment)
    result = run_status(run_dir)
    tags = {"qwen15_exp.run_dir": str(run_dir), "qwen15_exp.status": str(result.get("status")),
            "mlflow.runName": f"{job}: {result.get('model')} {result.get('parallel')} {result.get('phase')}"
            if job is not None else str(run_dir.name)}
    if sweep_dir:
        tags.update({"qwen15_exp.sweep_dir": sweep_dir, "qwen15_exp.job": str(job)})
    run = client.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    _log_batch(client, run_id, params=flat_params(config),
               metrics=step_metrics(result) + [(k, v, 0) for k, v in summary_metrics(result).items()])
    _log_files(client, run_id, run_dir, ARTIFACTS)
    for results in sorted(run_files.lm_eval_dir(run_dir).glob("*/results_*.json")):     # eval.tasks
        client.log_artifact(run_id, str(results), "lm_eval")
    client.set_terminated(run_id, MLFLOW_STATUS.get(result.get("status"), "FAILED"))
    return run_id


def log_sweep(tracking: dict, output_root: str, experiment: str, sweep_dir: Path, title: str) -> str:
    """The sweep's parent run: its report as artifacts, its jobs' runs as children."""
    client, exp_id = _open(tracking, output_root, experiment)
    run = client.create_run(exp_id, tags={"mlflow.runName": f"sweep: {title}",
                                          "qwen15_exp.sweep_dir": str(sweep_dir), "qwen15_exp.sweep": "true"})
    _log_files(client, run.info.run_id, sweep_dir, SWEEP_ARTIFACTS)
    # quotes inside the filter value are escaped by MLflow's parser only for single-quoted strings
    value = str(sweep_dir).replace("'", "\\'")
    for child in client.search_runs([exp_id], f"tags.`qwen15_exp.sweep_dir` = '{value}'", max_results=10000):
        if child.info.run_id != run.info.run_id:
            client.set_tag(child.info.run_id, "mlflow.parentRunId", run.info.run_id)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def unreachable_store(config) -> str | None:
    """Why the MLflow server the config names cannot be used, asked before the run: a refused connection is an
    answer (MLflow's client would retry it with back-off for minutes after training)."""
    import socket
    from urllib.parse import urlsplit
    tracking = _tracking(config)
    if tracking.get("backend") != "mlflow":
        return None
    uri = tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith(("http://", "https://")):
        return None                          # a local store: created on first use
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "", port), timeout=5).close()
    except (OSError, ValueError) as e:
        return (f"the MLflow store {uri} does not answer ({getattr(e, 'strerror', None) or e}); start it "
                "(mlflow server --host ... --port ...), fix tracking.uri, or leave out +tracking=mlflow")
    return None


def bound_retries() -> None:
    """A store that goes away mid-sweep is reported after a few tries, not after minutes of back-off."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _tracking(config) -> dict:
    return OmegaConf.to_container(config.tracking, resolve=True) if "tracking" in config else {}


TRACKING_FAILED: list[str] = []     # what could not be logged (read by __main__: the exit status says so)


def _say_failure(what: str, e: Exception) -> None:
    TRACKING_FAILED.append(what)
    print(f"mlflow: could not log {what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)


def sweep_ended(config, sweep_dir: Path, title: str) -> None:
    """Called by the sweep report once it is written (Hydra ends callbacks in reverse order, so a callback
    of our own would run before the report exists)."""
    tracking = _tracking(config)
    if tracking.get("backend") != "mlflow":
        return
    try:
        run_id = log_sweep(tracking, config.paths.output_root, config.experiment_name, sweep_dir, title)
        print(f"mlflow: sweep run {run_id}")
    except Exception as e:             # noqa: BLE001 - said, and the exit status says so
        _say_failure(f"the sweep {sweep_dir}", e)


class MlflowTracking(Callback):
    """Hydra callback (conf/tracking/mlflow.yaml): each job as an MLflow run once it ended. A store that
    cannot be reached is reported and the exit status is 1, but the job's own result stands."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = hydra_cfg.mode.name == "MULTIRUN"
        # the job's own keys, resolved (hydra's node holds sweep-only interpolations that do not resolve here)
        task_config = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]),
                                             resolve=True)
        try:
            run_id = log_job(_tracking(config), config.paths.output_root, config.experiment_name, run_dir,
                             task_config, str(Path(hydra_cfg.sweep.dir)) if multirun else None,
                             str(hydra_cfg.job.num) if multirun else None)
            if not multirun:               # a sweep's job keeps to its one line; the sweep run is printed
                print(f"mlflow: run {run_id}")
        except Exception as e:         # noqa: BLE001
            _say_failure(str(run_dir), e)
