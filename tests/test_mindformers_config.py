"""The hardware adaptations and what mindformers.yaml gets from them and from passthrough keys."""
from pathlib import Path

from helpers import make_experiment


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
