"""Real runs of the tiny model on this CPU through MindFormers' own Trainer (slow: tens of seconds)."""
import subprocess
import sys
import textwrap

import pytest

from helpers import only_run_dir, read_json, run_cli

pytestmark = pytest.mark.slow
STEPS = 24


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default_run")
    r = run_cli([f"phase.max_steps={STEPS}"], tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, only_run_dir(tmp), r


def test_default_run_writes_its_files_and_learns(default_run):
    tmp, run_dir, r = default_run
    result = read_json(run_dir / "result.json")
    m = result["measured"]
    assert result["status"] == "ok" and result["hardware"] == "cpu"
    assert m["steps"] == STEPS and len(m["loss"]) == STEPS and len(m["step_times_s"]) == STEPS
    assert m["loss"][0] > 11.0                                  # ln(151936) = 11.93 at random init
    assert m["loss_decreased"] and sum(m["loss"][-4:]) / 4 < m["loss"][0] - 1.0
    assert m["tokens_per_s"] > 0 and m["time_to_first_step_s"] > 0
    assert result["versions"]["mindspore"] == "2.9.0" and result["versions"]["mindformers"] == "1.9.0"
    assert (run_dir / "mindformers.yaml").is_file() and (run_dir / "plan.json").is_file()
    assert list((run_dir / "output" / "checkpoint" / "rank_0").glob("*.ckpt"))
    assert list((run_dir / "output" / "log").rglob("info.log"))
    assert "steps 24" in r.stdout and "(down)" in r.stdout
    assert sorted(p.name for p in tmp.iterdir()) == ["cache", "outputs"]   # nothing in the cwd


def test_the_terminal_shows_a_progress_line_and_the_summary_not_mindformers_log(default_run):
    _, run_dir, r = default_run
    assert "print_output_info" not in r.stdout and " - mindformers" not in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("  files: ")               # ends with the summary
    assert f"{STEPS}/{STEPS}" in r.stderr and "tokens/s" in r.stderr                 # the progress line, at the end
    assert "print_output_info" in next((run_dir / "output" / "log").rglob("info.log")).read_text()   # kept in files


def test_tensorboard_events_hold_the_losses_of_result_json(default_run):
    """MindFormers' own tensorboard block writes the run's events; tensorboard's reader finds result.json's losses.
    Read in a subprocess: once tensorboard has loaded protobuf in a process, MindSpore's MindRecord protos no longer
    load there (the data tests that follow would fail)."""
    import json
    _, run_dir, _ = default_run
    reader = textwrap.dedent(f"""
        import json
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator({str(run_dir / "tensorboard" / "rank_0")!r})
        events.Reload()
        print(json.dumps({{"tags": events.Tags()["scalars"],
                           "loss": [[e.step, e.value] for e in events.Scalars("loss")]}}))
    """)
    r = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    events = json.loads(r.stdout)
    assert {"loss", "learning-rate"} <= set(events["tags"])
    assert [step for step, _ in events["loss"]] == list(range(1, STEPS + 1))
    assert [v for _, v in events["loss"]] == pytest.approx(read_json(run_dir / "result.json")["measured"]["loss"],
                                                           abs=1e-5)


def test_a_second_identical_run_reuses_the_compile_cache_and_a_changed_one_compiles(tmp_path):
    """MindSpore says it used the cache (its own warning, shown with verbose=true); a changed learning rate,
    a graph constant, gets a cache of its own. A seed of this test's own keeps other tests' caches out."""
    import os
    args = ["phase.max_steps=2", "phase.seed=4242"]
    cache = {"XDG_CACHE_HOME": os.environ.get("QWEN15_TEST_CACHE", str(tmp_path / "cache"))}   # one for all three
    runs = [run_cli(args, tmp_path / "cold", env=cache), run_cli([*args, "verbose=true"], tmp_path / "warm", env=cache),
            run_cli([*args, "phase.lr_schedule.learning_rate=3e-4"], tmp_path / "changed", env=cache)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    cold, warm, changed = (read_json(only_run_dir(tmp_path / n) / "result.json") for n in ("cold", "warm", "changed"))
    assert cold["compile_cache"]["use"] == "compiled and cached"
    assert warm["compile_cache"] == {**cold["compile_cache"], "use": "reused"}
    assert "Use the compilation cache" in runs[1].stderr
    assert "compile cache: reused" in runs[1].stdout
    assert changed["compile_cache"]["use"] == "compiled and cached"
    assert changed["compile_cache"]["dir"] != cold["compile_cache"]["dir"]
    assert "Use the compilation cache" not in runs[0].stderr + runs[2].stderr


def test_a_run_process_does_without_pytorch_unless_asked():
    """MindFormers' tensorboardX imports torch when installed (3 s of every start here); a run process keeps it
    out, as if not installed, so that the libraries that check for it (datasets, scipy) carry on without it."""
    pytest.importorskip("torch")            # installed with the test extra: the case this is about
    probe = textwrap.dedent("""
        import importlib.util, sys
        from qwen15_exp.launch.start import skip_pytorch_import
        skip_pytorch_import()
        import mindformers, scipy.stats, tensorboardX                 # noqa: F401
        print(importlib.util.find_spec("torch") is None, "torch" in sys.modules)
        try:
            import torch                                               # noqa: F401
            print("imported")
        except ModuleNotFoundError:
            print("kept out")
    """)
    import os
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-4:] == ["True", "False", "kept", "out"], r.stdout    # after MindFormers' warnings
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "QWEN15_EXP_IMPORT_TORCH": "1"})
    assert r.returncode == 0 and r.stdout.split()[-3:] == ["False", "True", "imported"], r.stdout + r.stderr[-2000:]
