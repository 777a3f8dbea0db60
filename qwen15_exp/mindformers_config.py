"""Experiment -> the MindFormers run config: a plain dict, exactly what run_mindformer.py accepts.

The layout follows the official Qwen1.5 recipe YAMLs section by section. What the target hardware cannot
execute was decided in adapt.py (`Adapted`); this module only writes those values, so model, phase and
parallel files stay the same on every hardware. `+mindformers.<key>=...` overrides are merged last.
"""
from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import OmegaConf

from qwen15_exp.adapt import Adapted, adapt
from qwen15_exp.data.chatml import eos_token
from qwen15_exp.layout import Layout, layout_of
from qwen15_exp.weights.checkpoint import checkpoint_format


def merged(base: dict, extra: dict) -> dict:
    """base with extra merged in (nested keys merge, lists and scalars replace), as plain containers."""
    if not extra:
        return base
    return OmegaConf.to_container(OmegaConf.merge(base, extra), resolve=False)


def pet_config(lora) -> dict:
    """MindFormers' LoRA block (model_config.pet_config): build_network wraps the model with it."""
    cfg = {"pet_type": "lora", "lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
           "target_modules": lora.target_modules}
    if lora.trainable:
        cfg["freeze_exclude"] = list(lora.trainable)
    return cfg


def model_config(exp, adapted: Adapted) -> dict:
    m, ph, p = exp.model, exp.phase, exp.parallel
    dt, g, use_past = adapted.precision, ph.generation, adapted.use_past
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
        "use_flash_attention": adapted.flash_attention,
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
    if ph.lora is not None and ph.trains:
        cfg["pet_config"] = pet_config(ph.lora)
    if m.tie_word_embeddings:
        cfg["tie_word_embeddings"] = True
    if g.bos_token_id is not None:
        cfg["bos_token_id"] = g.bos_token_id
    if g.temperature is not None:
        cfg["temperature"] = g.temperature
    if ph.run_mode == "predict":
        # the CPU cache takes prompts of any length and block tables of any width: dynamic shapes (is_dynamic)
        cfg.update({"block_size": g.block_size, "num_blocks": adapted.kv_blocks,
                    "is_dynamic": (g.is_dynamic or adapted.cpu_kv_cache) and use_past,
                    "max_new_tokens": g.max_new_tokens})
    else:
        cfg["fine_grain_interleave"] = p.fine_grain_interleave
    if not adapted.fused_rms_norm:
        cfg["fused_rms_norm"] = False
        cfg["use_rope_slice"] = True      # avoids the BatchMatMul-based rotary swap
    if not adapted.lazy_inline:
        cfg["disable_lazy_inline"] = True
    return cfg


def runner_wrapper(exp, adapted: Adapted) -> dict:
    ph = exp.phase
    wrapper = {"type": adapted.train_step_wrapper}
    if adapted.loss_scale is not None:
        wrapper["scale_sense"] = adapted.loss_scale
    wrapper["use_clip_grad"] = ph.use_clip_grad
    if ph.max_grad_norm is not None:
        wrapper["max_grad_norm"] = ph.max_grad_norm
    return wrapper


def dataset_section(exp, dataset_dir: str, columns: list[str], adapted: Adapted) -> dict:
    return {
        "data_loader": {"type": "MindDataset", "dataset_dir": dataset_dir, "shuffle": exp.data.shuffle},
        "input_columns": columns,
        "num_parallel_workers": adapted.dataset_workers,
        "python_multiprocessing": False,
        "drop_remainder": True,
        "batch_size": exp.phase.batch_size,
        "repeat": 1,
        "numa_enable": False,
        "prefetch_size": 1,
    }


def eval_sections(exp, dataset_dir: str, columns: list[str], adapted: Adapted, run_dir: Path) -> dict:
    """MindFormers' evaluation: the dataset (one row per batch, none dropped) and the perplexity metric, which
    appends each evaluation to <run>/eval_rank<r>.jsonl (mindformers_ext.TokenPerplexity)."""
    section = dataset_section(exp, dataset_dir, columns, adapted)
    section.update(batch_size=1, drop_remainder=False)
    return {"eval_dataset": section,
            "eval_dataset_task": {"type": "CausalLanguageModelDataset", "dataset_config": copy.deepcopy(section)},
            "metric": {"type": "TokenPerplexity", "log_dir": str(run_dir)}}


def callbacks(exp, stop_step: int | None, save_steps: int) -> list:
    ck = exp.phase.checkpoint
    cbs = [{"type": "MFLossMonitor", "per_print_times": 1},
           {"type": "CheckpointMonitor", "prefix": ck.prefix, "save_checkpoint_steps": save_steps,
            "keep_checkpoint_max": ck.keep_max, "integrated_save": False, "async_save": False,
            "checkpoint_format": str(ck.format), "save_trainable_params": ck.save_trainable_params}]
    if stop_step:
        cbs.append({"type": "TrainCallBack", "stop_step": stop_step})
    return cbs


def context_section(exp, adapted: Adapted) -> dict:
    hw = exp.hardware
    ctx = {"mode": hw.mode, "device_target": str(hw.device_target), "device_id": 0, "max_call_depth": 10000, "save_graphs": False}
    if hw.jit_level:                       # "" leaves it to MindSpore's default, as some recipes do
        ctx["jit_config"] = {"jit_level": hw.jit_level}
    if hw.max_device_memory:
        ctx["max_device_memory"] = hw.max_device_memory
    return merged(ctx, dict(hw.context))


def parallel_sections(exp, L: Layout, adapted: Adapted, run_dir: Path) -> dict:
    p, ph = exp.parallel, exp.phase
    n_dev, mode = L.devices, adapted.parallel_mode
    predict = not ph.trains
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
    pc = {"data_parallel": L.data_parallel, "model_parallel": L.model_parallel,
          "pipeline_stage": L.pipeline_stage, "use_seq_parallel": p.use_seq_parallel,
          "micro_batch_num": L.micro_batch_num, "vocab_emb_dp": p.vocab_emb_dp,
          "gradient_aggregation_group": p.gradient_aggregation_group}
    if L.context_parallel > 1:
        pc["context_parallel"] = L.context_parallel
    if p.optimizer_shard is not None:
        pc["optimizer_shard"] = p.optimizer_shard
    return {"use_parallel": n_dev > 1, "parallel": parallel, "parallel_config": pc,
            "micro_batch_interleave_num": p.micro_batch_interleave_num}


def build(exp, run_dir: Path, dataset_dir: str = "", epochs: int | None = None, columns: list[str] | None = None,
          stop_step: int | None = None, total_steps: int | None = None, layout: Layout | None = None,
          adapted: Adapted | None = None, save_steps: int | None = None, resume=None,
          eval_dataset_dir: str = "", eval_columns: list[str] | None = None) -> dict:
    """The MindFormers run config of the experiment, as the target hardware will run it.

    `resume` (a weights.run_checkpoints.Checkpoint of this run) continues training through MindFormers'
    own resume: the run's checkpoint folder and the file to resume from; weights, optimizer state, step,
    learning rate and data position come back from it. MindFormers counts the steps of the new process
    from 1, so the stop step is the number of steps still to do."""
    ph = exp.phase
    L, adapted = layout or layout_of(exp), adapted or adapt(exp)
    default_columns = ["input_ids"] if exp.data.format == "wiki" else ["input_ids", "labels"]
    cfg = {
        "seed": ph.seed,
        "output_dir": f"{run_dir}/output",
        "load_checkpoint": ph.load_checkpoint,
        # a complete checkpoint on a layout that splits the weights: MindFormers cuts it to each rank's slice
        # (auto_trans_ckpt, no src_strategy: the source is not sharded)
        "auto_trans_ckpt": ph.auto_trans_ckpt or bool(ph.load_checkpoint and (L.model_parallel > 1
                                                                              or L.pipeline_stage > 1)),
        "only_save_strategy": False,
        "resume_training": False,
        "run_mode": str(ph.run_mode),
        "use_legacy": True,
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": exp.model.trainer_model_name},
        "do_eval": False,
        "runner_config": {"epochs": epochs or ph.epochs, "batch_size": ph.batch_size, "sink_mode": adapted.sink_mode,
                          "sink_size": 1},
        "context": context_section(exp, adapted),
        "model": {"model_config": model_config(exp, adapted), "arch": {"type": adapted.model_class}},
    }
    if resume is not None:
        cfg.update(load_checkpoint=str(Path(resume.files[0]).parent.parent), resume_training=resume.name,
                   auto_trans_ckpt=False)
    if cfg["load_checkpoint"] and checkpoint_format(cfg["load_checkpoint"]) == "safetensors":
        cfg["load_ckpt_format"] = "safetensors"
    if ph.gradient_accumulation_steps != 1:
        cfg["runner_config"]["gradient_accumulation_steps"] = ph.gradient_accumulation_steps
    cfg.update(parallel_sections(exp, L, adapted, run_dir))
    if ph.trains:
        lr = ph.lr_schedule
        schedule = {"type": lr.type, "learning_rate": lr.learning_rate, "warmup_ratio": lr.warmup_ratio,
                    "total_steps": total_steps if total_steps else lr.total_steps}
        if lr.lr_end is not None:
            schedule["lr_end"] = lr.lr_end
        opt = ph.optimizer
        cfg.update({
            "runner_wrapper": runner_wrapper(exp, adapted),
            "optimizer": {"type": adapted.optimizer, "betas": list(opt.betas), "eps": opt.eps,
                          "weight_decay": opt.weight_decay, "learning_rate": lr.learning_rate},
            "lr_schedule": schedule,
            "recompute_config": {k: getattr(ph.recompute, k) for k in (
                "recompute", "select_recompute", "parallel_optimizer_comm_recompute", "mp_comm_recompute",
                "recompute_slice_activation")},
            "callbacks": callbacks(exp, stop_step - resume.step if (stop_step and resume) else stop_step,
                                   save_steps or 1000),
            # MindFormers' own TensorBoard writer (loss, learning rate, throughput, grad norm, eval loss) into
            # <run dir>/tensorboard/rank_<r>: `tensorboard --logdir <outputs>` shows runs and sweeps side by side
            "tensorboard": {"tensorboard_dir": f"{run_dir}/tensorboard", "tensorboard_queue_size": 10},
        })
        section = dataset_section(exp, dataset_dir, columns or default_columns, adapted)
        cfg["train_dataset"] = section
        cfg["train_dataset_task"] = {"type": "CausalLanguageModelDataset", "dataset_config": copy.deepcopy(section)}
        if ph.eval.every_steps:          # the eval rows are seq_length tokens wide, as the network takes them
            cfg.update(eval_sections(exp, eval_dataset_dir, eval_columns or default_columns, adapted, run_dir),
                       do_eval=True, eval_step_interval=ph.eval.every_steps, eval_epoch_interval=-1)
    elif ph.run_mode == "eval":
        # whole rows (seq_length+1 tokens) go through the network, whose PerplexityCell scores tokens 1..n
        cfg["model"]["model_config"]["seq_length"] += 1
        cfg.update(eval_sections(exp, dataset_dir, columns or default_columns, adapted, run_dir))
    else:
        cfg["processor"] = {"return_tensors": "ms", "type": "LlamaProcessor",
                            "tokenizer": {"type": "PreTrainedTokenizerFast",
                                          "tokenizer_file": f"{run_dir}/tokenizer.json",
                                          "eos_token": eos_token(ph.chat), "pad_token": eos_token(False)}}
        if adapted.numpy_sampling:
            cfg["postprocess_use_numpy"] = True
        if ph.export:                     # read by qwen15_exp's worker: export instead of generating
            cfg["export_mindir"] = True
    cfg = merged(cfg, dict(exp.mindformers))
    if "train_dataset" in cfg:             # one section, as the recipes' YAML anchor makes it
        cfg["train_dataset_task"]["dataset_config"] = copy.deepcopy(cfg["train_dataset"])
    return cfg
