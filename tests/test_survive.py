"""Runs that survive: real processes are killed (SIGTERM, SIGINT, SIGKILL, during a checkpoint save), nothing
is left running, result.json says how each ended, and a resumed run gives the same per-step losses as an
uninterrupted one (1e-5 on CPU), single process and dp2 through msrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from helpers import read_json, run_cli

STEPS = 12
COMMON = ["hardware=cpu", f"phase.max_steps={STEPS}", "phase.checkpoint.save_steps=3"]


def cli_env(out: Path) -> dict:
    return {**os.environ, "QWEN15_EXP_OUTPUTS": str(out),
            "XDG_CACHE_HOME": os.environ.get("QWEN15_TEST_CACHE", str(out.parent / "cache"))}


def start(out: Path, args: list[str]) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "qwen15_exp", *args], env=cli_env(out), stdout=log,
                            stderr=subprocess.STDOUT, cwd=out.parent)


def run_dir_of(out: Path) -> Path:
    return next(out.rglob("plan.json")).parent


def wait_for(predicate, timeout: float = 300, every: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def steps_done(out: Path) -> int:
    logs = list(out.rglob("steps_rank0.jsonl"))
    return sum(1 for _ in logs[0].open()) if logs else 0


def tree(pid: int) -> list:
    try:
        return [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_all_gone(procs: list, timeout: float = 30) -> None:
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    names = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive if p.is_running()]
    for p in alive:            # do not leave them behind even when the assertion fails
        p.kill()
    assert not names, f"left running: {names}"


def losses(run_dir: Path) -> list[float]:
    result = read_json(run_dir / "result.json")
    assert result["measured"]["step_numbers"] == list(range(1, len(result["measured"]["loss"]) + 1))
    return result["measured"]["loss"]


def resume(out: Path, run_dir: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen15_exp", f"resume={run_dir}", *extra], env=cli_env(out),
                          capture_output=True, text=True, timeout=900, cwd=out.parent)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference curves: the same runs, never stopped."""
    tmp = tmp_path_factory.mktemp("reference")
    curves = {}
    for name, extra in (("single", []), ("dp2", ["parallel=dp2"])):
        r = subprocess.run([sys.executable, "-m", "qwen15_exp", *COMMON, *extra], env=cli_env(tmp / name),
                           capture_output=True, text=True, timeout=900, cwd=tmp)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        curves[name] = losses(run_dir_of(tmp / name))
        assert len(curves[name]) == STEPS
    return curves


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_continues_the_curve(tmp_path, uninterrupted):
    out = tmp_path / "out"
    proc = start(out, COMMON)
    wait_for(lambda: steps_done(out) >= 5)
    procs = tree(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert_all_gone(procs)
    run_dir = run_dir_of(out)
    result = read_json(run_dir / "result.json")
    assert result["status"] == "interrupted" and "SIGTERM" in result["error"] and "resume=" in result["error"]
    stopped = result["checkpoint"]["step"]
    assert 5 <= stopped < STEPS and len(result["measured"]["loss"]) == stopped      # checkpoint at the last step
    r = resume(out, run_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok" and result["resumed_from_step"] == stopped
    np.testing.assert_allclose(losses(run_dir), uninterrupted["single"], atol=1e-5, rtol=0)
    # after success only keep_after_success=1 checkpoint stays
    assert len(list((run_dir / "output" / "checkpoint" / "rank_0").glob("*.ckpt"))) == 1


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    out = tmp_path / "out"
    proc = start(out, COMMON)
    ckpt_dir = out   # found once the run dir exists

    def saving():
        tmps = list(ckpt_dir.rglob("checkpoint/rank_0/*.tmp"))
        complete = list(ckpt_dir.rglob("checkpoint/rank_0/*.ckpt"))
        return tmps if complete else None          # a save in progress, with an earlier checkpoint on disk

    partial = wait_for(saving, every=0.002)
    procs = tree(proc.pid)
    proc.kill()
    proc.wait(timeout=60)
    assert_all_gone(procs)
    run_dir = run_dir_of(out)
    from qwen15_exp.lifecycle import run_status
    assert run_status(run_dir)["status"] == "killed"
    r = resume(out, run_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not any(p.exists() for p in partial)                        # the partial file was cleaned
    assert "removed 1 partial checkpoint" in r.stdout or not partial[0].exists()
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok" and result["resumed_from_step"] % 3 == 0
    np.testing.assert_allclose(losses(run_dir), uninterrupted["single"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_dp2_main_process_killed_leaves_nothing_and_resumes(tmp_path, uninterrupted, sig):
    out = tmp_path / "out"
    proc = start(out, COMMON + ["parallel=dp2"])
    wait_for(lambda: steps_done(out) >= 4)
    procs = tree(proc.pid)
    from qwen15_exp.launch.msrun import is_worker
    assert sum(is_worker(p) for p in procs) == 2
    ports = {c.laddr.port for p in procs for c in p.net_connections() if c.status == psutil.CONN_LISTEN}
    os.kill(proc.pid, sig)                          # the main pid alone, as a scheduler or the OOM killer does
    proc.wait(timeout=180)
    assert_all_gone(procs)
    held = {c.laddr.port for c in psutil.net_connections() if c.status == psutil.CONN_LISTEN}
    assert not ports & held, f"ports still held: {ports & held}"
    run_dir = run_dir_of(out)
    from qwen15_exp.lifecycle import run_status
    status = run_status(run_dir)
    if sig == signal.SIGKILL:
        assert status["status"] == "killed" and "resume=" in status["error"]
    else:
        assert status["status"] == "interrupted" and proc.returncode == 128 + signal.SIGINT
        ranks = [read_json(p) for p in sorted(run_dir.glob("rank_*.json"))]
        assert len(ranks) == 2 and ranks[0]["steps"][-1] == ranks[1]["steps"][-1]     # one agreed stop step
        assert status["checkpoint"]["step"] == ranks[0]["steps"][-1]
    r = resume(out, run_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert read_json(run_dir / "result.json")["status"] == "ok"
    np.testing.assert_allclose(losses(run_dir), uninterrupted["dp2"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_dp2_start_up_ends_when_the_workers_are_gone(tmp_path, sig):
    """A signal while msrun starts its workers: they stop, and so does the run, without waiting for
    launch.stop_grace_s (120 s) or msrun's scheduler; it says which signal it was and leaves nothing."""
    out = tmp_path / "out"
    proc = start(out, COMMON + ["parallel=dp2"])
    from qwen15_exp.launch.msrun import is_worker
    wait_for(lambda: any(is_worker(p) for p in tree(proc.pid)), timeout=120)
    procs = tree(proc.pid)
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    proc.wait(timeout=100)
    stop_s = time.monotonic() - t0
    assert_all_gone(procs)
    assert stop_s < 60, f"took {stop_s:.0f} s to stop"          # was the whole grace period (120 s)
    assert proc.returncode == 128 + sig
    result = read_json(run_dir_of(out) / "result.json")
    assert result["status"] == "interrupted" and f"stopped by {signal.Signals(sig).name}" in result["error"]
    log = (out.parent / "out.log").read_text()
    assert f"stopped by {signal.Signals(sig).name}" in log and "continue with: python -m qwen15_exp resume=" in log


def test_resume_refuses_another_model_or_layout(tmp_path):
    r = run_cli(["hardware=cpu", "launch.mode=plan"], tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = next((tmp_path / "outputs").rglob("plan.json")).parent
    r = run_cli([f"resume={run_dir}", "model=mini"], tmp_path)
    assert r.returncode == 2 and "change the model" in r.stderr and "Traceback" not in r.stderr
    r = run_cli([f"resume={run_dir}", "parallel=dp2"], tmp_path)
    assert r.returncode == 2 and "started as single" in r.stderr and "parallel=single" in r.stderr
    r = run_cli([f"resume={tmp_path}"], tmp_path)
    assert r.returncode == 2 and "not a qwen15_exp run dir" in r.stderr


def test_latest_checkpoint_skips_truncated_files_and_stale_meta(tmp_path):
    """meta.json names a rotated-away file, the newest file is truncated: the previous good one is used."""
    from qwen15_exp.weights.run_checkpoints import clean_partial, latest_complete
    from qwen15_exp.weights.tensors import write_streaming
    rank = tmp_path / "output" / "checkpoint" / "rank_0"
    rank.mkdir(parents=True)

    def save(name, step):
        write_streaming(rank / name, [("w", "F32", (4,)), ("step_num", "I64", (1,))],
                        lambda n: np.ones(4, np.float32) if n == "w" else np.array([step], np.int64))
        t = time.time() + step              # mtimes in step order
        os.utime(rank / name, (t, t))

    save("qwen2_rank_0-1_3.safetensors", 3)
    save("qwen2_rank_0-1_6.safetensors", 6)
    newest = rank / "qwen2_rank_0-1_9.safetensors"
    save(newest.name, 9)
    newest.write_bytes(newest.read_bytes()[:-8])                      # truncated
    (rank / "qwen2_rank_0-1_12.tmp").write_bytes(b"partial")
    (rank / "meta.json").write_text(json.dumps({"last_step": 12, "last_ckpt_file": "qwen2_rank_0-1_12.ckpt"}))
    point = latest_complete(tmp_path, ranks=1)
    assert point.step == 6 and point.name == "qwen2_rank_0-1_6.safetensors"
    assert [p.name for p in clean_partial(tmp_path / "output" / "checkpoint")] == ["qwen2_rank_0-1_12.tmp"]
    assert latest_complete(tmp_path, ranks=2) is None                 # no rank_1: not a complete checkpoint


def test_killed_runs_are_reported_as_killed(tmp_path):
    from qwen15_exp.lifecycle import run_status
    (tmp_path / "plan.json").write_text("{}")
    assert run_status(tmp_path)["status"] == "killed"                       # a plan and no result
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "result.json").write_text(json.dumps({"status": "running", "pid": dead.pid}))
    assert run_status(tmp_path)["status"] == "killed"
    (tmp_path / "result.json").write_text(json.dumps({"status": "running", "pid": os.getpid()}))
    assert run_status(tmp_path)["status"] == "running"


def test_an_unreadable_result_is_said_not_called_killed(tmp_path):
    from qwen15_exp.lifecycle import run_status
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / "result.json").write_text('{"status": "o')                 # cut short
    status = run_status(tmp_path)
    assert status["status"] == "unreadable" and "not readable JSON" in status["error"]


def test_a_run_dir_as_weights_is_its_newest_complete_checkpoint(tmp_path):
    """phase.load_checkpoint=<run dir> takes what resume would: the newest step every rank completed."""
    from qwen15_exp.weights.checkpoint import checkpoint_of_run_dir, is_run_dir
    from qwen15_exp.weights.tensors import write_streaming
    (tmp_path / "plan.json").write_text(json.dumps({"devices": 1}))
    rank = tmp_path / "output" / "checkpoint" / "rank_0"
    rank.mkdir(parents=True)
    for step in (3, 6):
        write_streaming(rank / f"qwen2_rank_0-1_{step}.safetensors", [("w", "F32", (4,)), ("step_num", "I64", (1,))],
                        lambda n, s=step: np.ones(4, np.float32) if n == "w" else np.array([s], np.int64))
    assert is_run_dir(str(tmp_path)) and not is_run_dir(str(rank))
    assert checkpoint_of_run_dir(str(tmp_path)) == str(rank / "qwen2_rank_0-1_6.safetensors")


@pytest.mark.slow
def test_a_full_disk_during_a_save_fails_cleanly_and_names_the_previous_checkpoint(tmp_path):
    """The output root on a 200 MB tmpfs: tiny's first checkpoint (118 MB) fits, the second does not. The run
    ends `failed` with "No space left", one line on the terminal, the partial file removed, and the first
    checkpoint named to resume from."""
    out = tmp_path / "out"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(out)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = subprocess.run([sys.executable, "-m", "qwen15_exp", "hardware=cpu", "phase.max_steps=6",
                            "phase.checkpoint.save_steps=2"], env=cli_env(out), capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert "No space left" in r.stderr and "Traceback" not in r.stderr
        run_dir = run_dir_of(out)
        result = read_json(run_dir / "result.json")
        assert result["status"] == "failed" and result["failure_class"] == "disk full"
        assert result["checkpoint"]["step"] == 2 and "resume=" in result["error"]
        assert not list(run_dir.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(out)])
