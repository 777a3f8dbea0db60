"""phase=lora: MindFormers' pet_config from the config group, trainable parameters counted by hand, and a
memory estimate that gives gradients and optimizer state to the trainable parameters only."""
from pathlib import Path

import pytest

from conftest import make_experiment
from qwen15_exp.estimate.memory import estimate_memory, trainable_params
from qwen15_exp.estimate.throughput import train_flops_per_token
from qwen15_exp.plan import make_plan
from qwen15_exp.validate import validate

# tiny: hidden 64, 2 layers, 4 heads (no GQA): wq wk wv wo are 64 x 64; rank 8 adds 8 x (64 + 64) to each
ATTENTION_ADAPTERS = 2 * 4 * 8 * (64 + 64)                       # 8192
FFN_ADAPTERS = 2 * 3 * 8 * (176 + 64)                            # w1, w3: 176 x 64; w2: 64 x 176
NORMS = 2 * 2 * 64 + 64                                          # attention_norm, ffn_norm per layer, norm_out


@pytest.mark.parametrize("overrides,expected", [
    ([], ATTENTION_ADAPTERS),
    (["phase.lora.target_modules=.*w1|.*w2|.*w3"], FFN_ADAPTERS),
    (["phase.lora.trainable=[*norm*]"], ATTENTION_ADAPTERS + NORMS),
    (["phase.lora.rank=16"], 2 * ATTENTION_ADAPTERS),
])
def test_trainable_parameters_by_hand(overrides, expected):
    exp = make_experiment(["phase=lora", "hardware=cpu", *overrides])
    assert trainable_params(exp.model, exp.phase.lora) == expected
    assert make_plan(exp, Path("/tmp/x")).summary()["params_trainable"] == expected


def test_the_lora_knobs_reach_mindformers_pet_config():
    exp = make_experiment(["phase=lora", "hardware=cpu", "phase.lora.rank=4", "phase.lora.alpha=8",
                           "phase.lora.trainable=[*norm*]"])
    mc = make_plan(exp, Path("/tmp/x")).mindformers["model"]["model_config"]
    assert mc["pet_config"] == {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.05,
                                "target_modules": ".*wq|.*wk|.*wv|.*wo", "freeze_exclude": ["*norm*"]}
    assert "pet_config" not in make_plan(make_experiment(["hardware=cpu"]), Path("/tmp/x")).mindformers["model"][
        "model_config"]


def test_lora_fits_where_full_finetuning_does_not():
    """7B on 4-way tensor parallel cards with 30 GB: full AdamW state does not fit, LoRA's does."""
    layout = ["model=7b", "parallel=mp4", "hardware=atlas_800t_a2", "hardware.max_device_memory=30GB"]
    full, lora = make_experiment(layout), make_experiment(layout + ["phase=lora"])
    assert any(p.key == "hardware.max_device_memory" for p in validate(full))
    assert validate(lora) == []
    m_full, m_lora = estimate_memory(full), estimate_memory(lora)
    assert m_full.weights_gb < m_lora.weights_gb < m_full.weights_gb * 1.002       # frozen weights + adapters
    assert m_lora.optimizer_gb < m_full.optimizer_gb / 500                          # state for adapters only
    # no weight gradients for frozen weights: 4N + 2N_trainable instead of 6N (plus attention)
    assert train_flops_per_token(lora) < train_flops_per_token(full) * 0.7


def test_lora_targets_that_match_nothing_are_named():
    problems = validate(make_experiment(["phase=lora", "hardware=cpu", "phase.lora.target_modules=.*nothing"]))
    assert [p.key for p in problems] == ["phase.lora.target_modules"]
