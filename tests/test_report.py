"""Sweep reports that answer what a sweep asks: a column per swept key, the jobs that differ only by seed
grouped (mean and spread), settings ranked by a metric, a plot whose legend names the overrides."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from qwen15_exp.report import write_report


def fake_job(sweep, num, overrides, eval_loss, loss):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text("{}")
    (job / "result.json").write_text(json.dumps({
        "status": "ok", "model": "tiny", "phase": "finetune", "parallel": "single", "hardware": "cpu",
        "experiment": "default", "plan": {"throughput": {"kind": "train", "tokens_per_s": 900.0,
                                                         "tokens_per_s_per_device": 900.0}},
        "measured": {"last_loss": loss, "step_numbers": [1, 2], "loss": [loss + 1, loss],
                     "eval": [{"step": 2, "loss": eval_loss, "PPL": 2.718 ** eval_loss}],
                     "tokens_per_s_per_device": 800.0}}))


def test_a_learning_rate_sweep_report_ranks_settings_over_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [("2e-3", 1, 3.0, 2.9), ("2e-3", 2, 3.2, 3.1), ("5e-4", 1, 2.5, 2.4), ("5e-4", 2, 2.7, 2.6)]
    for num, (lr, seed, ev, loss) in enumerate(jobs):
        fake_job(sweep, num, ["data=alpaca", f"phase.lr_schedule.learning_rate={lr}", f"phase.seed={seed}",
                              "phase.max_steps=30"], ev, loss)
    paths = write_report(sweep, title="a learning-rate sweep " + "with a long title " * 8)
    rows = list(csv.DictReader((sweep / "sweep_report.csv").open()))
    assert list(rows[0])[:3] == ["job", "learning_rate", "seed"]           # the swept keys, not max_steps
    assert [(r["learning_rate"], r["seed"]) for r in rows] == [("2e-3", "1"), ("2e-3", "2"), ("5e-4", "1"),
                                                                ("5e-4", "2")]
    report = (sweep / "sweep_report.md").read_text()
    assert "Settings ranked by eval_loss (lower is better" in report
    ranked = report.split("Settings ranked by")[1].splitlines()[4:6]
    assert ranked[0].startswith("| 1 | 5e-4 | 2,3 | 2.6 +- 0.14") and ranked[1].startswith("| 2 | 2e-3 | 0,1 | 3.1 +- 0.14")
    assert paths[-1].stat().st_size > 10_000                              # the plot, with its third panel
    write_report(sweep, rank_by="loss")
    assert "Settings ranked by loss (lower is better" in (sweep / "sweep_report.md").read_text()


def test_a_throughput_sweep_keeps_its_ranking_by_measurement(tmp_path):
    sweep = tmp_path / "sweep"
    for num, layout in enumerate(["single", "dp2"]):
        fake_job(sweep, num, [f"parallel={layout}"], 3.0, 2.0)
        result = json.loads((sweep / str(num) / "result.json").read_text())
        del result["measured"]["eval"]
        (sweep / str(num) / "result.json").write_text(json.dumps(result))
    write_report(sweep)
    report = (sweep / "sweep_report.md").read_text()
    assert "Settings ranked by" not in report and "| job | parallel |" in report


@pytest.mark.slow
def test_the_learning_rate_sweep_a_new_user_runs_compares_learning_rates_over_seeds(tmp_path):
    """The sweep of issue 28, run for real: four jobs (two learning rates x two seeds) evaluated every 10 steps on
    a held-out file."""
    from helpers import run_cli
    from qwen15_exp.report import collect, job_label
    sample = Path(__file__).resolve().parents[1] / "qwen15_exp" / "samples" / "alpaca_sample.json"
    records = json.loads(sample.read_text())
    (tmp_path / "my.json").write_text(json.dumps(records[:48], ensure_ascii=False))
    (tmp_path / "held.json").write_text(json.dumps(records[48:], ensure_ascii=False))
    r = run_cli(["-m", "data=alpaca", "data.input=my.json", "phase.max_steps=30",
                 "phase.lr_schedule.learning_rate=2e-3,5e-4", "phase.seed=1,2", "phase.eval.every_steps=10",
                 "phase.eval.input=held.json"], tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    rows = list(csv.DictReader((sweep / "sweep_report.csv").open()))
    assert list(rows[0])[:3] == ["job", "learning_rate", "seed"] and len(rows) == 4
    report = (sweep / "sweep_report.md").read_text()
    ranked = report.split("Settings ranked by eval_loss (lower is better")[1].splitlines()[4:6]
    assert {line.split(" | ")[1] for line in ranked} == {"0.002", "0.0005"} and all(" +- " in line for line in ranked)
    means = [float(line.split(" | ")[3].split(" +- ")[0]) for line in ranked]     # the eval_loss column
    assert means == sorted(means)                                             # best (lowest) first
    labels = [job_label(row) for row in collect(sweep)]
    assert {lb.split(": ", 1)[1] for lb in labels} == {f"learning_rate={lr} seed={s}" for lr in ("0.002", "0.0005")
                                                       for s in (1, 2)}
    assert (sweep / "sweep_report.png").stat().st_size > 10_000
