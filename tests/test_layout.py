"""The layout object (built once per run from the degrees), its names, and the launch choice beside it.
Expected values are computed by hand in each case."""
import pytest

from helpers import compose_cfg, make_experiment
from qwen15_exp.launch.choose import choose_launcher
from qwen15_exp.layout import layout_name, layout_of, parse_layout_name


@pytest.mark.parametrize("overrides,expected", [
    # 72B finetune: 1 x 8 x 4 = 32 NPUs on 4 nodes of 8; pipeline: global batch = 1 x dp 1 x 64 micro batches;
    # seq 2048 -> 131,072 tokens per step; no NPUs here -> a plan (7B: seq 4096)
    (["model=72b", "parallel=mp8pp4", "hardware=atlas_800t_a2"],
     dict(name="mp8pp4", devices=32, nodes=4, devices_here=8, global_batch=64, tokens_per_step=64 * 2048)),
    # a preset with one degree overridden is named by its degrees: dp4 x mp2 = 8 NPUs, one node
    (["model=7b", "parallel=dp4", "parallel.model_parallel=2", "hardware=atlas_800t_a2"],
     dict(name="dp4mp2", devices=8, nodes=1, devices_here=8, global_batch=4, tokens_per_step=4 * 4096)),
    # no pipeline: global batch = batch 2 x dp 2 x accumulation 3 = 12; tiny's seq 128 -> 1536 tokens
    (["parallel=dp2", "hardware=atlas_800t_a2", "phase.batch_size=2", "phase.gradient_accumulation_steps=3"],
     dict(name="dp2", devices=2, nodes=1, devices_here=2, global_batch=12, tokens_per_step=1536)),
    # pipeline: accumulation is the micro batches (4), not gradient_accumulation_steps
    (["model=7b", "parallel=dp4pp2", "parallel.micro_batch_num=4", "phase.gradient_accumulation_steps=3",
      "hardware=atlas_800t_a2"],
     dict(name="dp4pp2", devices=8, nodes=1, devices_here=8, global_batch=16, tokens_per_step=16 * 4096)),
    # micro_batch_interleave_num: MindFormers feeds batch x 2 samples per micro-batch (two interleaved halves):
    # global batch = 1 x dp 4 x 2 = 8 (the 14B pretrain recipe), seq 32768
    (["+experiment=recipe/pretrain_14b"],
     dict(name="dp4mp4", devices=16, nodes=2, global_batch=8, tokens_per_step=8 * 32768)),
    (["hardware=cpu"], dict(name="single", devices=1, nodes=1, devices_here=1, global_batch=1, tokens_per_step=128)),
    (["phase=predict", "hardware=cpu"], dict(name="single", devices=1, global_batch=1, tokens_per_step=0)),
    # explicit nodes win over devices / devices_per_node
    (["model=7b", "parallel=dp8", "parallel.nodes=2", "hardware=atlas_800t_a2", "hardware.devices_per_node=4"],
     dict(devices=8, nodes=2, devices_here=4)),
])
def test_layout_derived_values(overrides, expected):
    layout = layout_of(make_experiment(overrides))
    for key, value in expected.items():
        assert getattr(layout, key) == value, key


def test_layout_names_and_terms():
    assert layout_name(1, 1, 1) == "single"
    assert layout_name(4, 2, 1) == "dp4mp2"
    assert layout_name(1, 8, 4) == "mp8pp4"
    assert layout_name(2, 1, 1, 2) == "dp2cp2"
    layout = layout_of(make_experiment(["model=7b", "parallel=dp4", "parallel.model_parallel=2",
                                        "hardware=atlas_800t_a2"]))
    assert layout.terms == "data_parallel=4 x model_parallel=2 x pipeline_stage=1"
    for name in ("single", "dp4mp2", "mp8pp4", "dp2cp2", "dp8"):
        degrees = parse_layout_name(name) or {}
        assert layout_name(*(degrees.get(k, 1) for k in ("data_parallel", "model_parallel", "pipeline_stage",
                                                          "context_parallel"))) == name
    assert parse_layout_name("mp3") == {"model_parallel": 3}
    assert parse_layout_name("dp2cp4") == {"data_parallel": 2, "context_parallel": 4}
    assert parse_layout_name("mp2dp4") is None and parse_layout_name("") is None


def test_overridden_degrees_rename_the_layout_everywhere():
    exp = make_experiment(["model=7b", "parallel=dp4", "parallel.model_parallel=2", "hardware=atlas_800t_a2"])
    assert exp.parallel.name == "dp4mp2"
    exp = make_experiment(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2"])
    assert exp.parallel.name == "dp8" and exp.hardware.name == "atlas_800t_a2"    # untouched preset keeps its name


@pytest.mark.parametrize("overrides,npus,expected", [
    (["model=72b", "parallel=mp8pp4", "hardware=atlas_800t_a2"], False, ("plan", False)),
    (["model=72b", "parallel=mp8pp4", "hardware=atlas_800t_a2"], True, ("msrun", True)),
    (["hardware=cpu"], False, ("local", True)),
    (["phase=predict", "hardware=cpu"], False, ("local", True)),
    (["hardware=cpu", "parallel=dp2"], False, ("msrun", True)),
    (["hardware=cpu", "launch.mode=plan"], False, ("plan", False)),
])
def test_the_launch_choice(overrides, npus, expected):
    exp = make_experiment(overrides)
    choice = choose_launcher(exp, layout_of(exp), npus=npus)
    assert (choice.launcher, choice.executes) == expected and choice.why


def test_a_run_builds_layout_adaptations_launch_choice_and_memory_once(tmp_path, monkeypatch):
    """As torchtitan builds ParallelDims once: one Layout, one Adapted, one launch choice, one memory estimate
    along a whole run (compose -> validate -> plan -> launch files)."""
    import qwen15_exp.adapt as adapt_module
    import qwen15_exp.estimate.memory as memory
    import qwen15_exp.launch.choose as choose
    import qwen15_exp.layout as layout
    from qwen15_exp.run import run

    calls = dict.fromkeys(["layout", "adapted", "choice", "memory"], 0)

    def count(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(layout.Layout, "__init__", count("layout", layout.Layout.__init__))
    monkeypatch.setattr(adapt_module.Adapted, "__init__", count("adapted", adapt_module.Adapted.__init__))
    monkeypatch.setattr(choose.LaunchChoice, "__init__", count("choice", choose.LaunchChoice.__init__))
    monkeypatch.setattr(memory, "_estimate", count("memory", memory._estimate))
    for overrides in (["hardware=cpu", "launch.mode=plan"],
                      ["model=72b", "parallel=mp8pp4", "hardware=atlas_800t_a2"],
                      ["phase=predict", "model=7b", "hardware=atlas_800t_a2", "parallel=mp2"]):
        calls.update(dict.fromkeys(calls, 0))
        result = run(compose_cfg(overrides), tmp_path / overrides[-1], 0.0)
        assert result["status"] == "planned"
        assert calls == {"layout": 1, "adapted": 1, "choice": 1, "memory": 1}, overrides
