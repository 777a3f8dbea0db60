"""Every config composes into a typed Experiment; the model group holds the exact Qwen1.5 dimensions."""
import itertools

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from qwen15_exp.compose import group_options
from qwen15_exp.estimate.memory import total_params
from qwen15_exp.schema import Experiment
from helpers import compose_cfg, make_experiment

SIZES = ["0_5b", "1_8b", "4b", "7b", "14b", "32b", "72b"]
# (hidden, layers, heads, kv heads, intermediate, vocab, theta, eps, tied) of each official size
QWEN15 = {
    "0_5b": (1024, 24, 16, None, 2816, 151936, 1e6, 1e-6, True),
    "1_8b": (2048, 24, 16, None, 5504, 151936, 1e6, 1e-6, False),
    "4b": (2560, 40, 20, None, 6912, 151936, 5e6, 1e-6, False),
    "7b": (4096, 32, 32, None, 11008, 151936, 1e6, 1e-6, False),
    "14b": (5120, 40, 40, None, 13696, 152064, 1e6, 1e-6, False),
    "32b": (5120, 64, 40, 8, 27392, 152064, 1e6, 1e-6, False),
    "72b": (8192, 80, 64, None, 24576, 152064, 1e6, 1e-5, False),
}


def test_group_options_exist():
    assert set(SIZES + ["tiny"]) <= set(group_options("model"))
    assert {"pretrain", "finetune", "predict", "chat"} <= set(group_options("phase"))
    assert {"cpu", "atlas_800t_a2", "atlas_900_a2_podc", "auto"} <= set(group_options("hardware"))
    assert {"single", "dp2", "dp8", "dp4pp2", "mp8", "dp4mp4", "mp2pp4", "mp8pp4", "mp8pp8", "mp2", "mp4"} \
        <= set(group_options("parallel"))


@pytest.mark.parametrize("model,phase,hardware", itertools.product(
    ["tiny"] + SIZES, ["pretrain", "finetune", "predict", "chat"], ["cpu", "atlas_800t_a2", "atlas_900_a2_podc", "auto"]))
def test_every_model_phase_hardware_composes(model, phase, hardware):
    exp = make_experiment([f"model={model}", f"phase={phase}", f"hardware={hardware}"])
    assert isinstance(exp, Experiment)
    assert exp.model.name == model and exp.phase.name == phase
    assert exp.hardware.name != "auto"           # auto is resolved at compose time
    assert exp.data.seq_length == exp.model.seq_length


@pytest.mark.parametrize("parallel", group_options("parallel"))
def test_every_parallel_layout_composes(parallel):
    exp = make_experiment([f"parallel={parallel}", "model=72b", "hardware=atlas_800t_a2"])
    p = exp.parallel
    assert p.name == parallel
    assert p.data_parallel * p.model_parallel * p.pipeline_stage >= 1


@pytest.mark.parametrize("size", SIZES)
def test_official_dimensions(size):
    m = make_experiment([f"model={size}"]).model
    h, layers, heads, kv, ffn, vocab, theta, eps, tied = QWEN15[size]
    assert (m.hidden_size, m.num_layers, m.num_heads, m.n_kv_heads, m.intermediate_size, m.vocab_size) == \
        (h, layers, heads, kv, ffn, vocab)
    assert (m.theta, m.rms_norm_eps, m.tie_word_embeddings, m.qkv_has_bias) == (theta, eps, tied, True)


def test_72b_parameter_count_and_chat_eps():
    exp = make_experiment(["model=72b"])
    assert total_params(exp.model) == 72_287_920_128
    assert exp.model.chat_rms_norm_eps == 1e-6


def test_tiny_is_qwen15_shaped():
    m = make_experiment([]).model
    assert (m.vocab_size, m.rms_norm_eps, m.theta, m.qkv_has_bias) == (151936, 1e-6, 1e6, True)
    assert total_params(m) < 20_000_000


def test_defaults_are_the_documented_default_run():
    exp = make_experiment([])
    assert (exp.model.name, exp.phase.name, exp.parallel.name, exp.hardware.name, exp.data.format) == \
        ("tiny", "finetune", "single", "cpu", "alpaca")
    assert exp.data.input.endswith("alpaca_sample.json")


def test_auto_picks_ascend_for_what_this_machine_cannot_run():
    assert make_experiment(["model=72b", "parallel=mp8pp4"]).hardware.name == "atlas_800t_a2"
    assert make_experiment(["model=7b"]).hardware.name == "atlas_800t_a2"        # 7B fp32 state > RAM
    assert make_experiment(["parallel=dp2"]).hardware.name == "cpu"


def test_overrides_reach_the_typed_config():
    exp = make_experiment(["parallel=mp8pp4", "parallel.micro_batch_num=48", "data.seq_length=4096",
                           "model=72b", "phase.lr_schedule.learning_rate=3e-6"])
    assert exp.parallel.micro_batch_num == 48 and exp.data.seq_length == 4096
    assert exp.phase.lr_schedule.learning_rate == 3e-6


@pytest.mark.parametrize("override", ["model.hiden_size=4", "parallel.data_parallel=two", "phase.epochs=1.5x",
                                      "hardware.bogus=1"])
def test_schema_rejects_typos_and_wrong_types(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg([override])


def test_hardware_overrides_apply_to_the_profile_auto_picks():
    exp = make_experiment(["model=72b", "parallel=mp8pp4", "hardware.max_device_memory=40GB",
                           "+hardware.env.HCCL_BUFFSIZE=2"])
    # a changed profile does not claim the preset's name
    assert exp.hardware.name == "atlas_800t_a2 (modified: max_device_memory, env)"
    assert exp.hardware.max_device_memory == "40GB" and exp.hardware.env == {"HCCL_BUFFSIZE": "2"}
    assert exp.hardware.devices_per_node == 8
