"""Slurm for real: a one-node cluster on this machine (tests/slurm_cluster.py installs and starts it) runs a
sweep as Slurm jobs through hydra/launcher=slurm, and a plan's slurm.sbatch runs its node script."""
import os
import subprocess
import sys

import pytest
import yaml

from helpers import read_json, run_cli
from slurm_cluster import Cluster, install


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = install()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.left_running()            # every daemon we started is gone


@pytest.mark.slow
def test_a_sweep_runs_as_slurm_jobs_and_names_its_failed_member(slurm, tmp_path):
    # cpus_per_task=2: one job at a time on this 2-core node; seed -1 is a member that fails (invalid seed)
    before = slurm.job_states()
    r = run_cli(["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=2", "model=tiny", "hardware=cpu",
                 "phase.max_steps=5", "phase.seed=1,2,3,-1"], tmp_path, env=slurm.env, timeout=1200)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]     # the sweep reports, and says it failed
    sweep = next(tmp_path.glob("outputs/multirun/*/*"))
    results = {int(p.parent.name): read_json(p) for p in sweep.glob("*/result.json")}
    assert sorted(results) == [0, 1, 2, 3]
    assert [results[i]["status"] for i in range(4)] == ["ok", "ok", "ok", "invalid"]
    assert all(results[i]["measured"]["steps"] == 5 for i in range(3))
    assert len({tuple(results[i]["measured"]["loss"]) for i in range(3)}) == 3          # three seeds, three runs
    report = (sweep / "sweep_report.md").read_text()
    assert "1 of 4 jobs did not end ok: job 3 invalid" in report
    assert f"{sweep / '3'}" in r.stderr
    # every member ran as a Slurm job (an array of four), and Slurm saw each of them complete
    job_ids = sorted({p.name.split("_")[0] for p in sweep.glob(".submitit/*_*") if p.name[0].isdigit()})
    assert len(job_ids) == 1
    states = {job: state for job, state in slurm.job_states().items() if job not in before}
    assert list(states.values()) == ["COMPLETED"] * 4, states


@pytest.mark.slow
def test_a_plan_is_one_sbatch_away(slurm, tmp_path):
    r = run_cli(["hardware=cpu", "parallel=dp2", "launch.mode=plan", "phase.max_steps=3",
                 "launch.slurm.time_min=30", "launch.slurm.exclusive=false"], tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = next((tmp_path / "outputs").rglob("slurm.sbatch")).parent
    assert "sbatch slurm.sbatch" in r.stdout
    data = run_cli(["hardware=cpu", "phase.max_steps=1"], tmp_path / "data")     # prepares the same dataset
    assert data.returncode == 0, data.stderr
    written = yaml.safe_load(next((tmp_path / "data" / "outputs").rglob("mindformers.yaml")).read_text())
    dataset_dir = written["train_dataset"]["data_loader"]["dataset_dir"]
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"     # msrun, as an activated venv
    sub = subprocess.run(["sbatch", "--parsable", "--wait", "slurm.sbatch"], cwd=run_dir, capture_output=True,
                         text=True, env={**slurm.env, "TRAIN_DATA": dataset_dir, "PATH": path}, timeout=900)
    job = sub.stdout.strip().split(";")[0]
    assert sub.returncode == 0, sub.stderr + (run_dir / f"slurm-{job}.out").read_text()[-3000:]
    assert slurm.job_states()[job] == "COMPLETED"
    assert [len(read_json(run_dir / f"rank_{r}.json")["losses"]) for r in (0, 1)] == [3, 3]
    result = read_json(run_dir / "result.json")          # node 0 collected the ranks after msrun
    assert result["status"] == "ok" and result["measured"]["steps"] == 3
    assert result["measured"]["ranks_collected"] == "2 of 2" and result["checkpoint"]["step"] == 3
