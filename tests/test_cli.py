"""The command line as a user meets it: help, --cfg, plans for big models, clear errors with exit code 2."""
import pytest

from helpers import only_run_dir, read_json, run_cli


def test_help_lists_the_groups(tmp_path):
    r = run_cli(["--help"], tmp_path)
    assert r.returncode == 0
    for line in ("model: 0_5b, 14b, 1_8b, 32b, 4b, 72b, 7b, mini, tiny", "phase: chat, eval, export, finetune, lora, predict, pretrain"):
        assert line in r.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    r = run_cli(["--cfg", "job", "model=72b", "parallel=mp8pp4"], tmp_path)
    assert r.returncode == 0
    assert "hidden_size: 8192" in r.stdout and "model_parallel: 8" in r.stdout
    assert list(tmp_path.iterdir()) == []                  # nothing written anywhere near cwd


def test_72b_finetune_on_a_machine_without_npus_is_a_plan(tmp_path):
    r = run_cli(["model=72b", "phase=finetune", "parallel=mp8pp4"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "nothing was executed" in r.stdout
    assert "tokens/s/p +-17%" in r.stdout                    # every estimate states its uncertainty
    run_dir = only_run_dir(tmp_path)
    result = read_json(run_dir / "result.json")
    assert result["status"] == "planned" and result["measured"] is None
    assert result["plan"]["throughput"]["uncertainty"] == 0.17
    assert result["plan"]["devices"] == 32 and result["plan"]["nodes"] == 4
    assert (run_dir / "mindformers.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outputs"]   # the CPU calibration: XDG_CACHE_HOME


@pytest.mark.parametrize("args,needle", [
    (["model=73b"], "Could not find 'model/73b'"),
    (["parallel=mp3"], "parallel"),
    (["model.hidden_size=big"], "hidden_size"),
    (["data=alpaca", "data.input=missing.json"], "missing.json does not exist"),
    (["model=72b", "parallel.model_parallel=3", "hardware=atlas_800t_a2"], "num_heads=64"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, args, needle):
    r = run_cli(args, tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("mindformers.yaml"))


def test_multirun_of_plans_gives_one_result_per_job(tmp_path):
    r = run_cli(["-m", "model=0_5b,1_8b,4b", "hardware=atlas_800t_a2", "parallel=dp4",
                 "parallel.model_parallel=2"], tmp_path)
    assert r.returncode == 0, r.stderr
    results = sorted(tmp_path.glob("outputs/multirun/*/*/*/result.json"))
    assert [read_json(p)["model"] for p in results] == ["0_5b", "1_8b", "4b"]
    assert all(read_json(p)["status"] == "planned" for p in results)
    assert all(read_json(p)["parallel"] == "dp4mp2" for p in results)      # named by its degrees, not the preset
    job_lines = [line for line in r.stdout.splitlines() if line.startswith("job ")]     # one line per job
    assert [line.split()[1:4] for line in job_lines] == [["0", "planned", "0_5b"], ["1", "planned", "1_8b"],
                                                         ["2", "planned", "4b"]]
    assert all(" dp4mp2 finetune atlas_800t_a2 " in line for line in job_lines)
    assert "qwen15_exp  default  [planned]" not in r.stdout           # the full summary went to each run dir
    assert all("parallel dp4mp2" in (p.parent / "summary.txt").read_text() for p in results)
    sweep = results[0].parent.parent
    report = (sweep / "sweep_report.md").read_text()
    assert report.count("| planned |") == 3 and report.count("| dp4mp2 |") == 3
    assert report.startswith("# qwen15_exp sweep: model=0_5b,1_8b,4b hardware=atlas_800t_a2 parallel=dp4 "
                             "parallel.model_parallel=2")
    assert (sweep / "sweep_report.png").stat().st_size > 1000
    assert (sweep / "sweep_report.csv").read_text().splitlines()[0].startswith("job,model,experiment")  # swept first


def test_published_table_sweep_reports_estimate_against_published(tmp_path):
    r = run_cli(["-m", "+experiment=table_900_a2_podc"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import csv
    sweep = next(tmp_path.glob("outputs/multirun/*/*"))
    rows = list(csv.DictReader((sweep / "sweep_report.csv").open()))
    assert [int(float(row["published"])) for row in rows] == [21171, 11241, 4844, 671, 787, 183]
    assert all(row["est/pub"] and row["fits"] in ("fits", "tight") for row in rows)
    report = (sweep / "sweep_report.md").read_text()
    assert "estimate vs published, training rows: n=6" in report
    assert report.startswith("# qwen15_exp sweep: table_900_a2_podc\n")           # titled by its experiment


def test_a_sweep_says_why_exits_non_zero_and_a_rerun_redoes_only_what_did_not_end_well(tmp_path):
    import csv
    sweep = tmp_path / "sweep"
    args = ["-m", "model=7b,72b", "hardware=atlas_800t_a2", "parallel=dp8", f"hydra.sweep.dir={sweep}"]
    r = run_cli(args, tmp_path)
    assert r.returncode == 1 and "did not end ok" in r.stderr           # 72B on 8 NPUs without sharding: invalid
    rows = {row["model"]: row for row in csv.DictReader((sweep / "sweep_report.csv").open())}
    assert rows["7b"]["status"] == "planned" and rows["72b"]["status"] == "invalid"
    assert rows["72b"]["reason"].startswith("1. [hardware] hardware.max_device_memory: estimated")   # the problem
    report = (sweep / "sweep_report.md").read_text()
    assert "1 of 2 jobs did not end ok: job 1 invalid" in report and "hydra.sweep.dir" in report
    first_plan = (sweep / "0" / "plan.json").stat().st_mtime_ns
    (sweep / "1" / "result.json").unlink()                              # as if killed before it wrote one
    r = run_cli(args, tmp_path)
    assert r.returncode == 1
    assert "job 0: already planned" in r.stdout                          # kept, not planned again
    assert (sweep / "0" / "plan.json").stat().st_mtime_ns == first_plan
    assert read_json(sweep / "1" / "result.json")["status"] == "invalid"  # the missing one ran again
    # another sweep into the same folder would mix the two in one report and exit status: refused
    r = run_cli(["-m", "model=0_5b,1_8b", "hardware=atlas_800t_a2", "parallel=dp8", f"hydra.sweep.dir={sweep}"],
                tmp_path)
    assert r.returncode == 2 and "holds another sweep (model=7b,72b" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]


def test_a_slurm_sweep_without_slurm_is_a_clear_error(tmp_path):
    import os
    import sys
    bare = tmp_path / "bin"                  # a PATH without sbatch, sacct and srun, whatever this machine has
    bare.mkdir()
    r = run_cli(["-m", "hydra/launcher=submitit_slurm", "model=tiny", "phase.seed=1,2"], tmp_path,
                env={"PATH": f"{bare}:{os.path.dirname(sys.executable)}"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Slurm" in r.stderr and "sbatch, sacct, srun are not on PATH" in r.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_slurm_sweep_whose_controller_does_not_answer_is_a_clear_error(tmp_path):
    """sbatch is there but no slurmctld answers: Slurm's own reason in a line (it was a CalledProcessError)."""
    import os
    import sys
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("sbatch", "sacct", "srun"):
        (tools / name).write_text("#!/bin/sh\nexit 1\n")
    (tools / "scontrol").write_text("#!/bin/sh\necho 'Slurmctld(primary) at head is DOWN' \n"
                                    "echo 'slurm_ping error: Unable to contact slurm controller' >&2\nexit 1\n")
    for tool in tools.iterdir():
        tool.chmod(0o755)
    r = run_cli(["-m", "hydra/launcher=slurm", "model=tiny", "phase.seed=1,2"], tmp_path,
                env={"PATH": f"{tools}:{os.path.dirname(sys.executable)}:/usr/bin:/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "the Slurm controller does not answer" in r.stderr and "Unable to contact slurm controller" in r.stderr
    assert not (tmp_path / "outputs").exists()
