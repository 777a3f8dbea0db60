"""MLflow tracking against a real tracking server on localhost: a two-job sweep, read back with MlflowClient."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from helpers import read_json, run_cli
from qwen15_exp.launch.msrun import free_port
from qwen15_exp.tracking import flat_params, step_metrics, summary_metrics

@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` (its own process group: it forks workers) on a free port; stopped by that group."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")],
        cwd=store, stdout=open(store / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (store / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield uri
    finally:
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == proc.pid]
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        gone, alive = psutil.wait_procs(group, timeout=30)
        for p in alive:
            p.kill()
        assert not alive, f"mlflow server processes left: {alive}"


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.mark.slow
def test_a_two_job_sweep_reads_back_from_a_real_mlflow_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient
    out = run_cli(["-m", "+tracking=mlflow", f"tracking.uri={mlflow_server}", "experiment_name=tracked",
                   "phase.max_steps=4", "phase.seed=1,2"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = next((tmp_path / "outputs" / "multirun").glob("*/*"))

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tracked")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("qwen15_exp.sweep") == "true"]
    jobs = sorted((r for r in runs if r not in parents), key=lambda r: r.data.tags["qwen15_exp.job"])
    assert len(parents) == 1 and len(jobs) == 2
    parent = parents[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep_report.md", "sweep_report.csv"}

    for job, run in zip(("0", "1"), jobs):
        result = read_json(sweep_dir / job / "result.json")
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["phase.seed"] == str(int(job) + 1)
        assert run.data.params["model.name"] == "tiny"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, round(m.value, 5)) for m in sorted(history, key=lambda m: m.step)] == \
            [(s, round(v, 5)) for s, v in zip(result["measured"]["step_numbers"], result["measured"]["loss"])]
        assert len(history) == 4
        assert run.data.metrics["tokens_per_s"] == pytest.approx(result["measured"]["tokens_per_s"])
        assert run.data.metrics["estimated_tokens_per_s"] == pytest.approx(result["plan"]["throughput"]["tokens_per_s"])
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"mindformers.yaml", "plan.json",
                                                                          "result.json"}


@pytest.mark.slow
def test_a_store_that_fails_after_the_check_is_said_and_the_exit_status_says_so(tmp_path):
    """Something answers at the address but is no MLflow server (or it went away): the run stands, what could
    not be logged is said, and the exit status is 1."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def hang_up():                      # accepts and closes every connection: no HTTP answer
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()
    threading.Thread(target=hang_up, daemon=True).start()
    try:
        out = run_cli(["+tracking=mlflow", f"tracking.uri=http://127.0.0.1:{port}", "phase.max_steps=2"], tmp_path,
                      env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    finally:
        listener.close()
    assert out.returncode == 1
    assert "mlflow: could not log" in out.stderr and "tracking.uri" in out.stderr
    assert "Traceback" not in out.stderr
    result = read_json(next((tmp_path / "outputs").rglob("result.json")))
    assert result["status"] == "ok"     # the run itself stands


def test_what_a_job_logs_comes_from_its_result():
    result = {"plan": {"throughput": {"tokens_per_s": 400.0}, "memory": {"total_gb": 0.2, "budget_gb": 23.5}},
              "measured": {"step_numbers": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "tokens_per_s": 320.0,
                           "eval": [{"step": 2, "loss": 2.5, "PPL": 12.18}]},
              "wall_time_s": 30.0}
    assert step_metrics(result) == [("loss", 3.0, 1), ("loss", 2.0, 2), ("loss", 1.0, 3),
                                    ("eval_loss", 2.5, 2), ("eval_perplexity", 12.18, 2)]
    summary = summary_metrics(result)
    assert summary["estimate_over_measured"] == pytest.approx(1.25)
    assert summary["wall_time_s"] == 30.0 and "peak_rss_mb" not in summary
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == \
        {"a.b": "1", "a.c": "[1, 2]", "d": "None", "e": "{}"}


def test_a_store_that_does_not_answer_is_said_before_training(tmp_path):
    """A refused connection is an answer: said at once, exit 2, nothing trained (it was 250 s of retries after
    the training, their warnings on stdout)."""
    r = run_cli(["+tracking=mlflow", "tracking.uri=http://127.0.0.1:9", "hardware=cpu"], tmp_path, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "the MLflow store http://127.0.0.1:9 does not answer" in r.stderr and "nothing was run" in r.stderr
    assert not list(tmp_path.rglob("steps_rank0.jsonl")) and "WARNING" not in r.stdout
