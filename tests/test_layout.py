"""The layout object (built once per run), derived names, the hardware adaptations, one cache root, and no
import cycles. Expected values are computed by hand in each case."""
import ast
from pathlib import Path

import pytest

from conftest import REPO, compose_cfg, make_experiment, run_cli
from qwen15_exp.layout import layout_name, layout_of


@pytest.mark.parametrize("overrides,expected", [
    # 72B finetune: 1 x 8 x 4 = 32 NPUs on 4 nodes of 8; pipeline: global batch = 1 x dp 1 x 64 micro batches;
    # seq 2048 -> 131,072 tokens per step; no NPUs here -> a plan (7B: seq 4096)
    (["model=72b", "parallel=mp8pp4", "hardware=atlas_800t_a2"],
     dict(name="mp8pp4", devices=32, nodes=4, devices_here=8, global_batch=64, tokens_per_step=64 * 2048,
          launcher="plan", executes=False)),
    # a preset with one degree overridden is named by its degrees: dp4 x mp2 = 8 NPUs, one node
    (["model=7b", "parallel=dp4", "parallel.model_parallel=2", "hardware=atlas_800t_a2"],
     dict(name="dp4mp2", devices=8, nodes=1, devices_here=8, global_batch=4, tokens_per_step=4 * 4096,
          launcher="plan", executes=False)),
    # no pipeline: global batch = batch 2 x dp 2 x accumulation 3 = 12; tiny's seq 128 -> 1536 tokens
    (["parallel=dp2", "hardware=atlas_800t_a2", "phase.batch_size=2", "phase.gradient_accumulation_steps=3"],
     dict(name="dp2", devices=2, nodes=1, devices_here=2, global_batch=12, tokens_per_step=1536,
          launcher="plan", executes=False)),
    # pipeline: accumulation is the micro batches (4), not gradient_accumulation_steps
    (["model=7b", "parallel=dp4pp2", "parallel.micro_batch_num=4", "phase.gradient_accumulation_steps=3",
      "hardware=atlas_800t_a2"],
     dict(name="dp4pp2", devices=8, nodes=1, devices_here=8, global_batch=16, tokens_per_step=16 * 4096,
          launcher="plan", executes=False)),
    # micro_batch_interleave_num: MindFormers feeds batch x 2 samples per micro-batch (two interleaved halves):
    # global batch = 1 x dp 4 x 2 = 8 (the 14B pretrain recipe), seq 32768
    (["+experiment=recipe/pretrain_14b"],
     dict(name="dp4mp4", devices=16, nodes=2, global_batch=8, tokens_per_step=8 * 32768, launcher="plan")),
    (["hardware=cpu"], dict(name="single", devices=1, nodes=1, devices_here=1, global_batch=1, tokens_per_step=128,
                            launcher="local", executes=True)),
    (["phase=predict", "hardware=cpu"], dict(name="single", devices=1, global_batch=1, tokens_per_step=0,
                                             launcher="local", executes=True)),
    (["hardware=cpu", "launch.mode=plan"], dict(launcher="plan", executes=False)),
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


def test_overridden_degrees_rename_the_layout_everywhere():
    exp = make_experiment(["model=7b", "parallel=dp4", "parallel.model_parallel=2", "hardware=atlas_800t_a2"])
    assert exp.parallel.name == "dp4mp2"
    exp = make_experiment(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2"])
    assert exp.parallel.name == "dp8" and exp.hardware.name == "atlas_800t_a2"    # untouched preset keeps its name


def test_a_run_decides_the_launcher_and_estimates_memory_once(tmp_path, monkeypatch):
    import qwen15_exp.estimate.memory as memory
    import qwen15_exp.layout as layout
    from qwen15_exp.run import run

    calls = {"launcher": 0, "memory": 0}
    real_launcher, real_estimate = layout.choose_launcher, memory._estimate

    def count(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(layout, "choose_launcher", count("launcher", real_launcher))
    monkeypatch.setattr(memory, "_estimate", count("memory", real_estimate))
    for overrides in (["hardware=cpu", "launch.mode=plan"],
                      ["model=72b", "parallel=mp8pp4", "hardware=atlas_800t_a2"]):
        calls.update(launcher=0, memory=0)
        result = run(compose_cfg(overrides), tmp_path / overrides[-1], 0.0)
        assert result["status"] == "planned"
        assert calls == {"launcher": 1, "memory": 1}, overrides


def test_adaptations_are_the_ones_the_config_and_estimate_use():
    from qwen15_exp.adapt import adapt
    from qwen15_exp.plan import make_plan
    exp = make_experiment(["hardware=cpu"])
    adapted = adapt(exp)
    assert adapted.precision == dict.fromkeys(["compute", "param_init", "softmax", "rotary", "layernorm"], "float32")
    assert not adapted.flash_attention and not adapted.sink_mode and adapted.parallel_mode == 0
    assert adapted.loss_scale == 1.0 and adapted.train_step_wrapper == "CPUTrainOneStepCell"
    cfg = make_plan(exp, Path("/tmp/x")).mindformers
    mc = cfg["model"]["model_config"]
    assert mc["compute_dtype"] == "float32" and mc["use_flash_attention"] is False
    assert cfg["runner_wrapper"] == {"type": "CPUTrainOneStepCell", "scale_sense": 1.0, "use_clip_grad": True}
    ascend = adapt(make_experiment(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2"]))
    assert ascend.notes == () and ascend.precision["compute"] == "bfloat16" and ascend.flash_attention
    assert ascend.loss_scale["type"] == "DynamicLossScaleUpdateCell"


def test_mindformers_passthrough_merges_last_and_bypasses_validation():
    """`+mindformers.<key>=...` writes raw MindFormers keys into mindformers.yaml, nested keys merged."""
    from qwen15_exp.plan import make_plan
    exp = make_experiment(["hardware=cpu", "+mindformers.runner_config.sink_size=4",
                           "+mindformers.context.max_call_depth=20000", "+mindformers.profile=true"])
    cfg = make_plan(exp, Path("/tmp/x")).mindformers
    assert cfg["runner_config"]["sink_size"] == 4 and cfg["runner_config"]["batch_size"] == 1   # merged, not replaced
    assert cfg["context"]["max_call_depth"] == 20000 and cfg["context"]["device_target"] == "CPU"
    assert cfg["profile"] is True


def test_our_safetensors_needs_no_format_key():
    from qwen15_exp.plan import make_plan
    cfg = make_plan(make_experiment(["hardware=cpu", "phase.load_checkpoint=/w/qwen.safetensors"]),
                    Path("/tmp/x")).mindformers
    assert cfg["load_ckpt_format"] == "safetensors"
    cfg = make_plan(make_experiment(["hardware=cpu", "phase.load_checkpoint=/w/qwen.ckpt"]), Path("/tmp/x")).mindformers
    assert "load_ckpt_format" not in cfg


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    r = run_cli(["data.tokenizer_dir=/nonexistent"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "data.tokenizer_dir" in r.stderr and "/nonexistent/vocab.json" in r.stderr
    assert not list((tmp_path / "outputs").rglob("mindformers.yaml"))


def test_every_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    """Prepared data, converted weights and the CPU calibration all go under $XDG_CACHE_HOME/qwen15_exp."""
    import numpy as np

    from qwen15_exp.data.prepare import prepare
    from qwen15_exp.estimate import cpu_calibration
    from qwen15_exp.weights.checkpoint import mindformers_weights
    from qwen15_exp.weights.tensors import write_streaming

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    exp = make_experiment(["hardware=cpu"])
    prepared = prepare(exp.data, exp.data.seq_length, show_progress=False)
    calibration = cpu_calibration.load(refresh=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    tensors = [("model.embed_tokens.weight", "F32", (8, 4)), ("model.norm.weight", "F32", (4,))]
    write_streaming(hf / "model.safetensors", tensors, lambda n: np.ones(dict((t[0], t[2]) for t in tensors)[n],
                                                                          dtype=np.float32))
    converted = mindformers_weights(str(hf), show_progress=False)
    root = tmp_path / "xdg" / "qwen15_exp"
    assert Path(prepared.folder).parent == root / "data"
    assert Path(converted).parent == root / "weights"
    assert (root / "cpu_calibration.json").is_file() and calibration["fp32_tflops"] > 0
    assert not (tmp_path / "home").exists()


def _module_imports(path: Path, package: str) -> set[str]:
    """Every qwen15_exp module a file imports, at top level or inside functions."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(package))
    return out


def test_no_import_cycles():
    root = REPO / "qwen15_exp"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: {d for d in _module_imports(p, "qwen15_exp") if d in modules and d != m} for m, p in modules.items()}
    # packages re-export nothing, so an edge to a package is an edge to its __init__ only
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "qwen15_exp.chat" not in {d for m, ds in graph.items() if m.startswith("qwen15_exp.launch") for d in ds}


def test_outputs_root_is_written_once():
    texts = [p.read_text() for p in (REPO / "conf").rglob("*.yaml")]
    assert sum("QWEN15_EXP_OUTPUTS" in t for t in texts) <= 1
    assert sum("${paths.output_root}" in t for t in texts) >= 4       # config, chat, prepare, convert
