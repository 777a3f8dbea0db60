"""Every official Qwen1.5 recipe, composed from the groups, resolves to its published settings.

The expected values are the official MindFormers YAMLs' (research/qwen1_5, MindFormers <= r1.5.0), written
out here so the test needs nothing outside the repo. Keys the pinned MindFormers 1.9.0 forces to differ
(docs/RECIPES.md) are checked at their 1.9.0 values: optimizer AdamW, columns [input_ids, labels].
"""
from pathlib import Path

import pytest

from qwen15_exp.compose import group_options
from qwen15_exp.plan import make_plan
from qwen15_exp.validate import validate
from helpers import make_experiment

T, F = True, False
BF16, FP16, FP32 = "bfloat16", "float16", "float32"

# dims: hidden, layers, heads, n_kv_heads (None = key absent), vocab, intermediate, eps, theta, tied
DIMS = {
    "0_5b": (1024, 24, 16, None, 151936, 2816, 1e-6, 1e6), "1_8b": (2048, 24, 16, None, 151936, 5504, 1e-6, 1e6),
    "4b": (2560, 40, 20, None, 151936, 6912, 1e-6, 5e6), "7b": (4096, 32, 32, None, 151936, 11008, 1e-6, 1e6),
    "14b": (5120, 40, 40, None, 152064, 13696, 1e-6, 1e6), "32b": (5120, 64, 40, 8, 152064, 27392, 1e-6, 1e6),
    "72b": (8192, 80, 64, None, 152064, 24576, 1e-5, 1e6),
}

# Training recipes: run_mode, (dp, mp, pp, mbn, vocab_emb_dp, gag, optimizer_shard, offset, mbi),
# seq, (runner bs, dataset bs, epochs, shuffle, workers), dtypes (compute, param, softmax, rotary, layernorm),
# recompute (full, select, mp_comm, po_comm, slice), (wd, lr, warmup, lr_end), loss scale (value, factor,
# window) or None, max_grad_norm, (save steps, max_device_memory, jit_level, memory_optimize_level),
# max_decode_length, trainer.model_name, extra dotted keys
TRAIN = {
    "finetune_0_5b": ("finetune", (8, 1, 1, 1, F, 4, None, 0, 1), 8192, (1, 1, 2, F, 8),
                      (BF16, FP32, FP32, FP32, FP32), (F, F, T, F, F), (0.01, 1e-6, 0.0, 1e-6), (4096, 1, 1000),
                      None, (5000, "55GB", "O1", None), 512, "qwen1_5_0.5_b",
                      {"auto_trans_ckpt": T, "runner_config.gradient_accumulation_steps": None}),
    "finetune_1_8b": ("finetune", (8, 1, 1, 2, F, 4, None, 0, 1), 8192, (1, 1, 1, F, 8),
                      (BF16, FP32, FP32, FP32, FP32), (F, F, F, F, F), (0.01, 1e-6, 0.0, 1e-6), (4096, 2, 1000),
                      1.0, (5000, "55GB", "O1", None), 512, "qwen1.5_1.8b", {}),
    "finetune_4b": ("finetune", (4, 1, 2, 32, T, 4, None, 0, 1), 8192, (2, 1, 2, F, 8),
                    (BF16, FP32, FP32, FP32, FP32), (T, T, T, T, T), (0.01, 1e-6, 0.0, 1e-6), (4096, 1, 100000),
                    1.0, (5000, "58GB", "O1", "O0"), 512, "qwen1_5_4b",
                    {"runner_config.gradient_accumulation_steps": 8}),
    "pretrain_7b": ("train", (1, 8, 1, 1, F, 4, None, 0, 1), 32768, (1, 1, 5, T, 8),
                    (BF16, FP32, FP16, FP16, FP32), (F, F, F, F, F), (0.01, 1e-6, 0.01, None), (4096, 2, 1000),
                    None, (5000, "60GB", "O1", "O0"), 512, "qwen2_7b",
                    {"auto_trans_ckpt": T, "train_dataset.input_columns": ["input_ids"]}),
    "finetune_7b": ("finetune", (8, 1, 1, 1, T, 4, None, 0, 1), 4096, (1, 4, 5, T, 8),
                    (BF16, FP32, FP16, FP16, FP32), (T, F, T, F, F), (0.01, 1e-6, 0.01, None), (4096, 2, 1000),
                    None, (5000, "55GB", "O1", None), 512, "qwen2_7b", {}),
    "pretrain_14b": ("train", (4, 4, 1, 1, F, 8, T, 0, 2), 32768, (1, 1, 5, T, 16),
                     (BF16, FP32, FP32, FP32, FP32), (T, F, T, F, T), (0.01, 1e-6, 0.0, 1e-6), None,
                     None, (5000, "57GB", "O1", "O0"), 2048, "qwen2_14b", {}),
    "finetune_14b": ("finetune", (1, 2, 4, 128, F, 8, T, [-1, 1, 1, -1], 1), 4096, (1, 1, 5, T, 8),
                     (BF16, FP32, FP32, FP16, FP32), (F, F, F, F, F), (0.01, 1e-6, 0.0, 1e-6), None,
                     None, (5000, "57GB", "O1", "O0"), 2048, "qwen2_14b",
                     {"model.model_config.fine_grain_interleave": 2}),
    "finetune_32b": ("finetune", (1, 8, 4, 512, F, 8, T, 0, 1), 8192, (1, 1, 2, F, 8),
                     (BF16, FP32, FP32, FP16, FP32), (F, F, F, F, F), (0.1, 1.25e-6, 0.01, 1.25e-7), (4096, 2, 1000),
                     None, (500, "57GB", "O1", "O0"), 2048, "qwen1_5_32b",
                     {"model.model_config.fine_grain_interleave": 2, "model.model_config.max_position_embedding": 8192,
                      "model.model_config.bos_token_id": 151643}),
    "pretrain_72b": ("train", (1, 8, 8, 64, F, 8, None, 0, 1), 32768, (1, 4, 10, T, 8),
                     (BF16, FP32, FP32, FP32, FP32), (T, F, T, F, T), (0.01, 1e-6, 0.01, None), (4096, 2, 1000),
                     None, (400, "57GB", "O1", "O0"), 512, "qwen2_72b", {"context.mempool_block_size": "57GB"}),
    "finetune_72b": ("finetune", (1, 8, 4, 64, F, 8, None, 0, 1), 2048, (2, 4, 5, T, 8),
                     (BF16, FP32, FP32, FP32, FP32), (T, F, T, F, T), (0.01, 1e-6, 0.01, None), (4096, 2, 1000),
                     None, (400, "58GB", None, None), 512, "qwen2_72b", {}),
    "run_72b": ("train", (1, 8, 4, 64, F, 8, None, 0, 1), 2048, (2, 4, 5, T, 8),
                (BF16, FP32, FP32, FP32, FP32), (T, F, T, F, T), (0.01, 1e-6, 0.01, None), (4096, 2, 1000),
                None, (400, "58GB", None, None), 512, "qwen2_72b",
                {"runner_config.sink_size": 2, "context.enable_graph_kernel": F, "context.runtime_num_threads": 1}),
}

# Predict recipes: (mp, vocab_emb_dp, use_parallel), seq, dtypes, (FA, use_past, is_dynamic, block, blocks),
# (max_decode, top_k, top_p, do_sample, temperature, repetition, eos, bos), max_device_memory, eps, extra
PREDICT = {
    "predict_0_5b_chat": ((1, F, F), 8192, (BF16, BF16, FP32, BF16, FP32), (T, T, T, 32, 1024),
                          (512, 5, 0.8, T, None, 1.1, [151643, 151645], 151643), "59GB", 1e-6,
                          {"model.model_config.tie_word_embeddings": T, "model.model_config.n_kv_heads": 16}),
    "predict_1_8b_chat": ((1, F, F), 8192, (BF16, BF16, FP32, BF16, FP32), (T, T, T, 32, 1024),
                          (512, 5, 0.8, T, None, 1.1, [151643, 151645], 151643), "59GB", 1e-6,
                          {"model.model_config.n_kv_heads": 16}),
    "predict_4b_chat": ((1, F, F), 8192, (BF16, BF16, FP32, BF16, FP32), (T, T, T, 32, 1024),
                        (512, 5, 0.8, T, None, 1.1, [151643, 151645], 151643), "59GB", 1e-6,
                        {"model.model_config.n_kv_heads": 20}),
    "predict_7b": ((1, T, F), 4096, (BF16, FP32, FP16, FP16, FP32), (T, T, T, 32, 1024),
                   (512, 0, 0.8, F, None, 1.0, 151643, 151643), "59GB", 1e-6, {}),
    "predict_7b_chat": ((1, T, F), 8192, (BF16, BF16, FP32, BF16, FP32), (T, T, T, 32, 1024),
                        (512, 20, 0.8, T, 0.7, 1.05, [151645, 151643], 151643), "59GB", 1e-6, {}),
    "predict_14b": ((1, T, F), 8192, (FP16, FP16, FP16, FP16, FP32), (T, T, T, 16, 1024),
                    (2048, 0, 0.8, F, None, 1.0, 151643, 151643), "59GB", 1e-6, {}),
    "predict_14b_chat": ((1, T, F), 8192, (BF16, BF16, FP32, BF16, FP32), (T, T, T, 32, 1024),
                         (2048, 20, 0.8, T, 0.7, 1.05, [151645, 151643], 151643), "59GB", 1e-6, {}),
    "predict_32b_chat": ((2, F, T), 8192, (BF16, BF16, FP32, BF16, BF16), (T, T, T, 32, 1024),
                         (512, 20, 0.8, F, 0.7, 1.05, [151643, 151645], 151643), "59GB", 1e-6,
                         {"model.model_config.n_kv_heads": 8, "trainer.model_name": "qwen2_32b"}),
    "predict_72b": ((4, T, T), 8192, (FP16, FP16, FP16, FP16, FP32), (T, T, T, 32, 512),
                    (2048, 0, 0.8, F, None, 1.0, 151643, 151643), "58GB", 1e-5, {}),
    "predict_72b_chat": ((4, T, T), 8192, (BF16, BF16, FP32, BF16, FP32), (T, T, T, 32, 512),
                         (2048, 20, 0.8, F, 0.7, 1.05, [151645, 151643], 151643), "58GB", 1e-6, {}),
    "run_72b_infer_2024_03": ((4, F, T), 8192, (FP16, FP16, FP16, FP16, FP32), (F, T, F, 32, 1024),
                              (512, 0, 0.8, F, None, 1.0, 151643, None), "58GB", 1e-5,
                              {"runner_config.sink_size": 2, "context.enable_graph_kernel": F}),
}
RECIPE_SIZE = {name: name.split("_", 1)[1].replace("_chat", "").replace("_infer_2024_03", "")
               for name in list(TRAIN) + list(PREDICT)}

MISSING = object()


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def resolved(name: str) -> dict:
    exp = make_experiment([f"+experiment=recipe/{name}"])
    assert validate(exp) == [], name
    return make_plan(exp, Path("/plans") / name).mindformers


def test_every_recipe_has_an_experiment_file():
    assert sorted(group_options("experiment/recipe")) == sorted(list(TRAIN) + list(PREDICT))
    assert len(TRAIN) + len(PREDICT) == 22


def check_dims(cfg, size, eps=None):
    mc = cfg["model"]["model_config"]
    h, layers, heads, kv, vocab, ffn, default_eps, theta = DIMS[size]
    assert (mc["hidden_size"], mc["num_layers"], mc["num_heads"], mc["vocab_size"], mc["intermediate_size"]) == \
        (h, layers, heads, vocab, ffn)
    assert mc["rms_norm_eps"] == (eps or default_eps) and mc["theta"] == theta and mc["qkv_has_bias"] is True
    if kv is not None:
        assert mc["n_kv_heads"] == kv
    assert cfg["model"]["arch"]["type"] == "LlamaForCausalLM" and mc["type"] == "LlamaConfig"


def check_dtypes(mc, dtypes):
    assert (mc["compute_dtype"], mc["param_init_type"], mc["softmax_compute_type"], mc["rotary_dtype"],
            mc["layernorm_compute_type"]) == dtypes


def check_extra(cfg, extra):
    for key, want in extra.items():
        got = get(cfg, key)
        assert (got is MISSING) if want is None else got == want, (key, got, want)


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_training_recipe(name):
    (run_mode, par, seq, batch, dtypes, rc, opt, ls, max_norm, ctx, max_decode, model_name, extra) = TRAIN[name]
    cfg = resolved(name)
    mc = cfg["model"]["model_config"]
    check_dims(cfg, RECIPE_SIZE[name])
    assert cfg["run_mode"] == run_mode and cfg["use_parallel"] is True and cfg["seed"] == 42
    dp, mp, pp, mbn, vocab_dp, gag, opt_shard, offset, mbi = par
    pc = cfg["parallel_config"]
    assert (pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"], pc["micro_batch_num"],
            pc["vocab_emb_dp"], pc["gradient_aggregation_group"], pc["use_seq_parallel"]) == \
        (dp, mp, pp, mbn, vocab_dp, gag, True)
    assert pc.get("optimizer_shard") == opt_shard and mc["offset"] == offset
    assert cfg["micro_batch_interleave_num"] == mbi
    assert cfg["parallel"]["parallel_mode"] == 1 and cfg["parallel"]["full_batch"] is True
    assert cfg["parallel"]["enable_parallel_optimizer"] is True and cfg["parallel"]["gradients_mean"] is False
    assert cfg["parallel"]["parallel_optimizer_config"] == {"gradient_accumulation_shard": False,
                                                            "parallel_optimizer_threshold": 64}
    assert mc["seq_length"] == seq
    runner_bs, data_bs, epochs, shuffle, workers = batch
    assert cfg["runner_config"]["batch_size"] == runner_bs and cfg["runner_config"]["epochs"] == epochs
    assert cfg["runner_config"]["sink_mode"] is True
    td = cfg["train_dataset"]
    assert td["batch_size"] == data_bs and td["data_loader"]["shuffle"] == shuffle
    assert td["num_parallel_workers"] == workers and td["data_loader"]["type"] == "MindDataset"
    assert cfg["train_dataset_task"] == {"type": "CausalLanguageModelDataset", "dataset_config": td}
    check_dtypes(mc, dtypes)
    assert mc["use_flash_attention"] is True and mc["use_past"] is False and mc["qkv_concat"] is False
    assert tuple(cfg["recompute_config"][k] for k in ("recompute", "select_recompute", "mp_comm_recompute",
                                                      "parallel_optimizer_comm_recompute",
                                                      "recompute_slice_activation")) == rc
    wd, lr, warmup, lr_end = opt
    assert cfg["optimizer"] == {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": wd,
                                "learning_rate": lr}
    sched = cfg["lr_schedule"]
    assert (sched["type"], sched["learning_rate"], sched["warmup_ratio"], sched["total_steps"]) == \
        ("CosineWithWarmUpLR", lr, warmup, -1)
    assert sched.get("lr_end") == lr_end
    wrapper = cfg["runner_wrapper"]
    assert wrapper["type"] == "MFTrainOneStepCell" and wrapper["use_clip_grad"] is True
    assert wrapper.get("max_grad_norm") == max_norm
    if ls is None:
        assert "scale_sense" not in wrapper
    else:
        assert wrapper["scale_sense"] == {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": ls[0],
                                          "scale_factor": ls[1], "scale_window": ls[2]}
    save_steps, max_mem, jit, mem_opt = ctx
    ckpt = next(c for c in cfg["callbacks"] if c["type"] == "CheckpointMonitor")
    # keep_checkpoint_max: the recipes keep 1; we keep at least 2 so a kill during a save leaves a good one
    assert (ckpt["prefix"], ckpt["save_checkpoint_steps"], ckpt["keep_checkpoint_max"]) == ("qwen2", save_steps, 2)
    assert [c["type"] for c in cfg["callbacks"]][:2] == ["MFLossMonitor", "CheckpointMonitor"]
    c = cfg["context"]
    assert (c["mode"], c["device_target"], c["max_call_depth"], c["max_device_memory"]) == (0, "Ascend", 10000, max_mem)
    assert get(c, "jit_config.jit_level") == (MISSING if jit is None else jit)
    assert c.get("memory_optimize_level") == mem_opt
    assert c["ascend_config"] == {"precision_mode": "must_keep_origin_dtype"}
    assert (mc["max_decode_length"], mc["top_k"], mc["top_p"], mc["do_sample"], mc["repetition_penalty"]) == \
        (max_decode, 0, 0.8, False, 1)
    assert (mc["eos_token_id"], mc["pad_token_id"]) == (151643, 151643)
    assert cfg["trainer"] == {"type": "CausalLanguageModelingTrainer", "model_name": model_name}
    check_extra(cfg, extra)


@pytest.mark.parametrize("name", sorted(PREDICT))
def test_predict_recipe(name):
    par, seq, dtypes, kv, gen, max_mem, eps, extra = PREDICT[name]
    cfg = resolved(name)
    mc = cfg["model"]["model_config"]
    check_dims(cfg, RECIPE_SIZE[name], eps)
    assert cfg["run_mode"] == "predict" and cfg["seed"] == 0
    mp, vocab_dp, use_parallel = par
    assert (cfg["parallel_config"]["model_parallel"], cfg["parallel_config"]["data_parallel"],
            cfg["parallel_config"]["pipeline_stage"]) == (mp, 1, 1)
    assert cfg["parallel_config"]["vocab_emb_dp"] == vocab_dp and cfg["use_parallel"] == use_parallel
    assert cfg["parallel_config"]["use_seq_parallel"] is False        # no predict YAML sets it
    assert cfg["parallel"]["enable_parallel_optimizer"] is False and "strategy_ckpt_config" in cfg["parallel"]
    assert mc["seq_length"] == seq and mc["max_position_embedding"] == seq
    check_dtypes(mc, dtypes)
    fa, use_past, dynamic, block, blocks = kv
    assert (mc["use_flash_attention"], mc["use_past"], mc["is_dynamic"], mc["block_size"], mc["num_blocks"]) == \
        (fa, use_past, dynamic, block, blocks)
    max_decode, top_k, top_p, sample, temp, rep, eos, bos = gen
    assert (mc["max_decode_length"], mc["top_k"], mc["top_p"], mc["do_sample"], mc["repetition_penalty"]) == \
        (max_decode, top_k, top_p, sample, rep)
    assert mc.get("temperature") == temp and mc["eos_token_id"] == eos and mc.get("bos_token_id") == bos
    assert mc["pad_token_id"] == 151643
    assert cfg["context"]["max_device_memory"] == max_mem and "jit_config" not in cfg["context"]
    for absent in ("optimizer", "lr_schedule", "train_dataset", "runner_wrapper", "callbacks"):
        assert absent not in cfg
    check_extra(cfg, extra)
