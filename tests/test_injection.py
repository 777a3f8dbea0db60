"""No injection: hostile strings in every string field of the schema reach the generated launch scripts and
the printed hints quoted. The scripts run against a fake msrun that records its argv and environment:
nothing the strings say is executed, and every value arrives byte-exact."""
import dataclasses
import os
import shlex
import subprocess
from enum import Enum
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import make_experiment, run_cli
from qwen15_exp.launch.msrun import msrun_args, write_launch_files
from qwen15_exp.plan import make_plan
from qwen15_exp.result import summary_text

FAKE_MSRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_OUT.argv"
env -0 > "$FAKE_OUT.env"
"""
# fields whose value is parsed or checked rather than passed on (validate() reports bad ones: see below)
# values read as something else than text; launch.rank_table (a file whose servers choose another script) is
# taken with hostile text in tests/test_rank_table.py
PARSED = {"hardware.max_device_memory", "parallel.name", "launch.rank_table"}


def fragments(marker: str):
    return st.sampled_from([
        "x", "\n", f"\ntouch {marker}\n#", f"$(touch {marker})", f"`touch {marker}`", f"'; touch {marker}; '",
        f'"; touch {marker}; "', ";", "&&", "|", "\\", "$HOME", "${PATH}", "*", "~", " ", "\t", "é漢🙂", "#", "-",
        "--join=True", "=", "%s", "\\n"])


def hostile(marker: str):
    return st.lists(fragments(marker), min_size=1, max_size=6).map("".join)


def string_fields(obj, prefix=""):
    """(dotted key, owner, attribute) of every plain str field of a dataclass tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from string_fields(value, key + ".")
        elif isinstance(value, str) and not isinstance(value, Enum) and key not in PARSED:
            yield key, obj, f.name


@pytest.fixture(scope="module")
def fake_msrun(tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "msrun").write_text(FAKE_MSRUN)
    (bin_dir / "msrun").chmod(0o755)
    return bin_dir


def run_script(script: Path, bin_dir: Path, out: Path) -> tuple[list[str], dict]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_OUT": str(out), "HOME": str(out.parent)}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, timeout=30, cwd=out.parent)
    assert r.returncode == 0, r.stderr
    argv = out.with_suffix(".argv").read_bytes().split(b"\0")[:-1]
    pairs = [kv.split(b"=", 1) for kv in out.with_suffix(".env").read_bytes().split(b"\0") if b"=" in kv]
    return [a.decode() for a in argv], {k.decode(): v.decode() for k, v in pairs}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_strings_never_execute_and_arrive_byte_exact(tmp_path_factory, fake_msrun, data):
    work = tmp_path_factory.mktemp("inj")
    marker = str(work / "pwned")
    exp = make_experiment(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2", "hardware.devices_per_node=4"])
    values = {}
    for key, owner, attr in string_fields(exp):
        values[key] = data.draw(hostile(marker), label=key)
        setattr(owner, attr, values[key])
    env_value = data.draw(hostile(marker), label="env value")
    exp.hardware.env = {"SAFE_NAME": env_value}
    plan = make_plan(exp, work / "run")
    scripts = write_launch_files(plan, exp)
    assert len(scripts) == 2
    result = {"experiment": exp.experiment_name, "status": "planned", "model": exp.model.name,
              "phase": exp.phase.name, "parallel": plan.layout.name, "hardware": exp.hardware.name,
              "run_dir": str(plan.run_dir), "plan": plan.summary(), "reference": {},
              "launch_scripts": [str(s) for s in scripts]}
    # the node script checks that the planned weights are on the node: put a file there (relative paths from the
    # run dir, where the script works)
    weights = Path(plan.run_dir) / values["phase.load_checkpoint"]
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.touch()
    hints = [line.split("bash ", 1)[1] for line in summary_text(result).splitlines() if "bash " in line]
    assert [shlex.split(h) for h in hints] == [[str(s)] for s in scripts]     # a printed hint is one word
    for rank, script in enumerate(scripts):
        argv, env = run_script(script, fake_msrun, work / f"out{rank}")
        expected = msrun_args(plan, exp, rank, exp.launch.master_addr, exp.launch.master_port)[1:]
        assert argv == expected
        assert env["SAFE_NAME"] == env_value
        assert env["QWEN15_EXP_EXPERIMENT"] == values["experiment_name"]
        assert env["QWEN15_EXP_MODEL"] == values["model.name"]
        assert env["QWEN15_EXP_HARDWARE"] == values["hardware.name"]
    assert not os.path.exists(marker)


@pytest.mark.parametrize("key", ["1BAD", "X;touch /tmp/x", "A B", "X\nY"])
def test_environment_names_must_be_identifiers(key, tmp_path):
    from qwen15_exp.validate import validate
    exp = make_experiment(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2"])
    exp.hardware.env = {key: "1"}
    assert any(p.key == "hardware.env" for p in validate(exp))


def test_the_reported_newline_exploit_is_inert(tmp_path, fake_msrun):
    """The report: a newline in experiment_name ran the next line of launch_node0.sh."""
    marker = tmp_path / "pwned"
    r = run_cli(["parallel=dp2", "hardware=cpu", "launch.mode=plan", "phase.max_steps=3",
                 f"experiment_name=\"x\ntouch {marker}\n#\""], tmp_path)
    assert r.returncode == 0, r.stderr
    script = next((tmp_path / "outputs").rglob("launch_node0.sh"))
    argv, env = run_script(script, fake_msrun, tmp_path / "out")
    assert env["QWEN15_EXP_EXPERIMENT"] == f"x\ntouch {marker}\n#"
    assert not marker.exists()


def test_plan_scripts_take_a_resume_point(tmp_path, fake_msrun):
    """An Ascend plan continues a stopped run: RESUME (and SRC_STRATEGY for a changed layout) reach the workers."""
    exp = make_experiment(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2"])
    plan = make_plan(exp, tmp_path / "run")
    script = write_launch_files(plan, exp)[0]
    env = {"PATH": f"{fake_msrun}:/usr/bin:/bin", "FAKE_OUT": str(tmp_path / "o"), "RESUME": "/ckpt dir/x",
           "SRC_STRATEGY": "/strategy"}
    assert subprocess.run(["bash", str(script)], env=env, timeout=30).returncode == 0
    argv = (tmp_path / "o.argv").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in argv[-4:]] == ["--resume", "/ckpt dir/x", "--src_strategy", "/strategy"]
    from qwen15_exp.launch.worker import parse_args
    args = parse_args([a.decode() for a in argv[argv.index(b"worker.py") + 1:]])
    assert args.resume == "/ckpt dir/x" and args.src_strategy == "/strategy"


def test_the_sbatch_script_keeps_hostile_names_inert(tmp_path):
    from qwen15_exp.launch.sbatch import sbatch_script
    exp = make_experiment(["model=72b", "phase=finetune", "parallel=mp8pp4", "experiment_name='x\ntouch PWNED #'",
                           "launch.slurm.partition='gpu; rm -rf /'", "launch.master_port=9000"])
    text = sbatch_script(make_plan(exp, tmp_path / "run"), exp)
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=x_touch_PWNED__", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                          "#SBATCH --time=1440", "#SBATCH --output=slurm-%j.out", "#SBATCH --partition=gpu__rm_-rf__",
                          "#SBATCH --exclusive"]
    script = tmp_path / "slurm.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "PWNED" not in text.split("set -euo pipefail")[1]
