"""Experiment -> the MindFormers run config: a plain dict, exactly what run_mindformer.py accepts.

The layout follows the official Qwen1.5 recipe YAMLs section by section. What the target hardware cannot
execute is adapted here, from `hardware.supports`, and every adaptation is listed (`adaptations`), so model,
phase and parallel files stay the same on every hardware.
"""
from __future__ import annotations

import copy
from pathlib import Path

from qwen15_exp.estimate.memory import effective_dtype
from qwen15_exp.layout import devices

CPU_TRAIN_STEP_WRAPPER = "CPUTrainOneStepCell"     # registered by qwen15_exp.mindformers_ext


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def semi_auto(exp) -> bool:
    """Recipes run every Ascend job in semi-auto parallel; CPU can only do stand-alone or data parallel."""
    return exp.hardware.supports.semi_auto_parallel


def parallel_mode(exp) -> int:
    return 1 if semi_auto(exp) else 0


def precision(exp, adaptations: list) -> dict:
    out = {}
    for name in ("compute", "param_init", "softmax", "rotary", "layernorm"):
        want, got = getattr(exp.phase.precision, name), effective_dtype(exp, name)
        if want != got:
            adaptations.append(f"precision.{name}: {want} -> {got} ({exp.hardware.name} has no {want})")
        out[name] = got
    return out


def model_config(exp, adaptations: list) -> dict:
    m, ph, sup, p = exp.model, exp.phase, exp.hardware.supports, exp.parallel
    dt = precision(exp, adaptations)
    g = ph.generation
    fa = ph.use_flash_attention and sup.flash_attention
    if ph.use_flash_attention and not fa:
        adaptations.append(f"use_flash_attention: true -> false ({exp.hardware.name} has no flash attention)")
    use_past = g.use_past and ph.run_mode == "predict"
    if use_past and not sup.kv_cache:
        adaptations.append(f"use_past: true -> false (the KV-cache kernels are Ascend-only; "
                           f"{exp.hardware.name} recomputes the full sequence per token)")
        use_past = False
    eps = m.chat_rms_norm_eps if (ph.chat and m.chat_rms_norm_eps) else m.rms_norm_eps
    cfg = {
        "type": "LlamaConfig",
        "batch_size": ph.batch_size,
        "seq_length": exp.data.seq_length,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "num_heads": m.num_heads,
        "vocab_size": m.vocab_size,
        "intermediate_size": m.intermediate_size,
        "qkv_has_bias": m.qkv_has_bias,
        "rms_norm_eps": eps,
        "theta": m.theta,
        "max_position_embedding": m.max_position_embedding,
        "emb_dropout_prob": 0.0,
        "eos_token_id": list(g.eos_token_id) if len(g.eos_token_id) > 1 else g.eos_token_id[0],
        "pad_token_id": m.pad_token_id,
        "ignore_token_id": -100,
        "compute_dtype": dt["compute"],
        "layernorm_compute_type": dt["layernorm"],
        "softmax_compute_type": dt["softmax"],
        "rotary_dtype": dt["rotary"],
        "param_init_type": dt["param_init"],
        "use_past": use_past,
        "extend_method": "None",
        "use_flash_attention": fa,
        "qkv_concat": False,
        "offset": list(p.offset) if isinstance(p.offset, (list, tuple)) else p.offset,
        "repetition_penalty": g.repetition_penalty,
        "max_decode_length": g.max_decode_length,
        "top_k": g.top_k,
        "top_p": g.top_p,
        "do_sample": g.do_sample,
    }
    if m.n_kv_heads:
        cfg["n_kv_heads"] = m.n_kv_heads
    if m.tie_word_embeddings:
        cfg["tie_word_embeddings"] = True
    if g.bos_token_id is not None:
        cfg["bos_token_id"] = g.bos_token_id
    if g.temperature is not None:
        cfg["temperature"] = g.temperature
    if ph.run_mode == "predict":
        cfg.update({"block_size": g.block_size, "num_blocks": g.num_blocks, "is_dynamic": g.is_dynamic and use_past})
    else:
        cfg["fine_grain_interleave"] = p.fine_grain_interleave
    if not sup.fused_rms_norm:
        cfg["fused_rms_norm"] = False
        cfg["use_rope_slice"] = True      # avoids the BatchMatMul-based rotary swap
    if not sup.lazy_inline:
        cfg["disable_lazy_inline"] = True
    return cfg


def runner_wrapper(exp, adaptations: list) -> dict:
    ph, sup = exp.phase, exp.hardware.supports
    wrapper = {"type": "MFTrainOneStepCell"}
    ls = ph.loss_scale
    fp32_compute = effective_dtype(exp, "compute") == "float32"
    if ls.kind == "dynamic" and not fp32_compute:
        wrapper["scale_sense"] = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": ls.value,
                                  "scale_factor": ls.factor, "scale_window": ls.window}
    elif ls.kind == "static" and not fp32_compute:
        wrapper["scale_sense"] = ls.value
    elif ls.kind != "none":
        adaptations.append("loss scale: dynamic -> 1.0 (fp32 compute needs no loss scaling)")
        wrapper["scale_sense"] = 1.0
    wrapper["use_clip_grad"] = ph.use_clip_grad
    if ph.max_grad_norm is not None:
        wrapper["max_grad_norm"] = ph.max_grad_norm
    if not sup.npu_overflow_status:
        adaptations.append(f"runner_wrapper: MFTrainOneStepCell -> {CPU_TRAIN_STEP_WRAPPER} (its overflow check "
                           "uses IsFinite; NPUGetFloatStatusV2 has no CPU kernel)")
        wrapper["type"] = CPU_TRAIN_STEP_WRAPPER
    return wrapper


def dataset_section(exp, dataset_dir: str, columns: list[str], adaptations: list) -> dict:
    ph, d, cap = exp.phase, exp.data, exp.hardware.max_dataset_workers
    workers = d.num_parallel_workers
    if cap and workers > cap:
        adaptations.append(f"num_parallel_workers: {workers} -> {cap} (MindSpore allows at most one per core)")
        workers = cap
    return {
        "data_loader": {"type": "MindDataset", "dataset_dir": dataset_dir, "shuffle": d.shuffle},
        "input_columns": columns,
        "num_parallel_workers": workers,
        "python_multiprocessing": False,
        "drop_remainder": True,
        "batch_size": ph.batch_size,
        "repeat": 1,
        "numa_enable": False,
        "prefetch_size": 1,
    }


def callbacks(exp, stop_step: int | None) -> list:
    ck = exp.phase.checkpoint
    cbs = [{"type": "MFLossMonitor", "per_print_times": 1},
           {"type": "CheckpointMonitor", "prefix": ck.prefix, "save_checkpoint_steps": ck.save_steps,
            "keep_checkpoint_max": ck.keep_max, "integrated_save": False, "async_save": False,
            "checkpoint_format": ck.format}]
    if stop_step:
        cbs.append({"type": "TrainCallBack", "stop_step": stop_step})
    return cbs


def context_section(exp) -> dict:
    hw = exp.hardware
    ctx = {"mode": hw.mode, "device_target": hw.device_target, "device_id": 0, "max_call_depth": 10000,
           "save_graphs": False}
    if hw.jit_level:                       # "" leaves it to MindSpore's default, as some recipes do
        ctx["jit_config"] = {"jit_level": hw.jit_level}
    if hw.max_device_memory:
        ctx["max_device_memory"] = hw.max_device_memory
    return deep_merge(ctx, dict(hw.context))


def parallel_sections(exp, run_dir: Path) -> dict:
    p, ph = exp.parallel, exp.phase
    n_dev = devices(exp)
    mode = parallel_mode(exp)
    predict = ph.run_mode == "predict"
    parallel = {
        "parallel_mode": mode,
        "gradients_mean": mode == 0 and n_dev > 1,     # data parallel averages; semi-auto loss is global
        "enable_alltoall": False,
        "full_batch": mode == 1,                       # data parallel reads one shard per rank
        "search_mode": "sharding_propagation",
        "enable_parallel_optimizer": p.enable_parallel_optimizer and not predict and n_dev > 1,
    }
    strategy = f"{run_dir}/output/strategy/ckpt_strategy.ckpt"
    if predict:
        parallel["strategy_ckpt_config"] = {"save_file": strategy, "only_trainable_params": False}
    else:
        parallel["strategy_ckpt_save_file"] = strategy
        parallel["parallel_optimizer_config"] = {"gradient_accumulation_shard": False,
                                                 "parallel_optimizer_threshold": p.parallel_optimizer_threshold}
    pc = {"data_parallel": p.data_parallel, "model_parallel": p.model_parallel,
          "pipeline_stage": p.pipeline_stage, "use_seq_parallel": p.use_seq_parallel,
          "micro_batch_num": p.micro_batch_num, "vocab_emb_dp": p.vocab_emb_dp,
          "gradient_aggregation_group": p.gradient_aggregation_group}
    if p.context_parallel > 1:
        pc["context_parallel"] = p.context_parallel
    if p.optimizer_shard is not None:
        pc["optimizer_shard"] = p.optimizer_shard
    return {"use_parallel": n_dev > 1, "parallel": parallel, "parallel_config": pc,
            "micro_batch_interleave_num": p.micro_batch_interleave_num}


def build(exp, run_dir: Path, dataset_dir: str = "", epochs: int | None = None, columns: list[str] | None = None,
          stop_step: int | None = None, total_steps: int | None = None) -> tuple[dict, list[str]]:
    """The MindFormers run config and the list of hardware adaptations made to it."""
    adaptations: list[str] = []
    ph, sup = exp.phase, exp.hardware.supports
    predict = ph.run_mode == "predict"
    sink = ph.sink_mode and sup.sink_mode
    if ph.sink_mode and not sink:
        adaptations.append(f"runner_config.sink_mode: true -> false ({exp.hardware.name} ignores sink mode, "
                           "and MindFormers would multiply the epochs)")
    cfg = {
        "seed": ph.seed,
        "output_dir": f"{run_dir}/output",
        "load_checkpoint": ph.load_checkpoint,
        "auto_trans_ckpt": ph.auto_trans_ckpt,
        "only_save_strategy": False,
        "resume_training": False,
        "run_mode": ph.run_mode,
        "use_legacy": True,
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": exp.model.trainer_model_name},
        "do_eval": False,
        "runner_config": {"epochs": epochs or ph.epochs, "batch_size": ph.batch_size, "sink_mode": sink, "sink_size": 1},
        "context": context_section(exp),
        "model": {"model_config": model_config(exp, adaptations), "arch": {"type": "LlamaForCausalLM"}},
    }
    if ph.gradient_accumulation_steps != 1:
        cfg["runner_config"]["gradient_accumulation_steps"] = ph.gradient_accumulation_steps
    cfg.update(parallel_sections(exp, run_dir))
    if not sup.semi_auto_parallel:
        adaptations.append("parallel.parallel_mode: 1 -> 0 (semi-auto parallel does not run on "
                           f"{exp.hardware.name}; data parallel only)")
    if not predict:
        lr = ph.lr_schedule
        schedule = {"type": lr.type, "learning_rate": lr.learning_rate, "warmup_ratio": lr.warmup_ratio,
                    "total_steps": total_steps if total_steps else lr.total_steps}
        if lr.lr_end is not None:
            schedule["lr_end"] = lr.lr_end
        opt = ph.optimizer
        cfg.update({
            "runner_wrapper": runner_wrapper(exp, adaptations),
            "optimizer": {"type": opt.type, "betas": list(opt.betas), "eps": opt.eps,
                          "weight_decay": opt.weight_decay, "learning_rate": lr.learning_rate},
            "lr_schedule": schedule,
            "recompute_config": {k: getattr(ph.recompute, k) for k in (
                "recompute", "select_recompute", "parallel_optimizer_comm_recompute", "mp_comm_recompute",
                "recompute_slice_activation")},
            "callbacks": callbacks(exp, stop_step),
        })
        default_columns = ["input_ids"] if exp.data.format == "wiki" else ["input_ids", "labels"]
        section = dataset_section(exp, dataset_dir, columns or default_columns, adaptations)
        cfg["train_dataset"] = section
        cfg["train_dataset_task"] = {"type": "CausalLanguageModelDataset", "dataset_config": copy.deepcopy(section)}
    else:
        cfg["processor"] = {"return_tensors": "ms", "type": "LlamaProcessor",
                            "tokenizer": {"type": "PreTrainedTokenizerFast",
                                          "tokenizer_file": f"{run_dir}/tokenizer.json",
                                          "eos_token": "<|im_end|>" if ph.chat else "<|endoftext|>",
                                          "pad_token": "<|endoftext|>"}}
        if not sup.kv_cache:
            cfg["postprocess_use_numpy"] = True    # TopK has no CPU kernel; sample in numpy
    cfg = deep_merge(cfg, dict(exp.mindformers))
    if "train_dataset" in cfg:             # one section, as the recipes' YAML anchor makes it
        cfg["train_dataset_task"]["dataset_config"] = copy.deepcopy(cfg["train_dataset"])
    return cfg, adaptations
