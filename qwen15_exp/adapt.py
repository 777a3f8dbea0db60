"""Hardware adaptations: what the target hardware cannot execute, and what replaces it. Pure.

One place decides, from `hardware.supports`, the dtypes, flash attention, fused RmsNorm, sink mode, the
parallel mode, the KV cache, the loss scale and the train-step wrapper a run gets. The MindFormers config
writes these values and the estimates compute with them, so both always describe the same run; each change
from what the phase asked for is explained once, in `notes`.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("compute", "param_init", "softmax", "rotary", "layernorm")
CPU_TRAIN_STEP_WRAPPER = "CPUTrainOneStepCell"     # registered by qwen15_exp.mindformers_ext
CPU_MODEL_CLASS = "CPULlamaForCausalLM"            # the same, with a one-kernel loss
CPU_OPTIMIZER = "CPUAdamW"                        # the same, AdamW through a kernel the CPU has


@dataclass(frozen=True)
class Adapted:
    precision: dict                 # compute/param_init/softmax/rotary/layernorm -> dtype the target runs
    flash_attention: bool
    fused_rms_norm: bool
    lazy_inline: bool
    sink_mode: bool
    semi_auto_parallel: bool        # parallel_mode 1 (model/pipeline parallel possible) or 0
    use_past: bool                  # KV cache (predict only)
    cpu_kv_cache: bool              # ... through qwen15_exp's CPU attention (kv_cache_cpu.py), kernel by kernel
    kv_blocks: int                  # cache blocks of generation.block_size positions the network allocates
    loss_scale: object              # None (no scale_sense key), a float, or a DynamicLossScaleUpdateCell dict
    train_step_wrapper: str
    model_class: str                # model.arch.type
    optimizer: str                  # optimizer.type
    dataset_workers: int
    numpy_sampling: bool            # generate's logits processors in numpy (TopK has no CPU kernel)
    notes: tuple                    # one line per adaptation, for the summary and plan.json

    @property
    def parallel_mode(self) -> int:
        return 1 if self.semi_auto_parallel else 0


def effective_dtype(wanted: str, supports) -> str:
    """A dtype as the target hardware will run it (a CPU has neither bf16 nor fp16 kernels here)."""
    if (wanted == "bfloat16" and not supports.bfloat16) or (wanted == "float16" and not supports.float16):
        return "float32"
    return str(wanted)


def _loss_scale(ls, fp32_compute: bool, notes: list):
    if ls.kind == "none":
        return None
    if fp32_compute:
        notes.append(f"loss scale: {ls.kind} -> 1.0 (fp32 compute needs no loss scaling)")
        return 1.0
    if ls.kind == "static":
        return ls.value
    return {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": ls.value, "scale_factor": ls.factor,
            "scale_window": ls.window}


def cache_blocks(batch: int, seq_length: int, block_size: int) -> int:
    """KV-cache blocks for a batch whose every sequence may grow to seq_length, and no more."""
    return batch * -(-seq_length // block_size)


def adapt(exp) -> Adapted:
    ph, hw, sup = exp.phase, exp.hardware, exp.hardware.supports
    name, notes = hw.name, []
    sink = ph.sink_mode and sup.sink_mode
    if ph.sink_mode and not sink:
        notes.append(f"runner_config.sink_mode: true -> false ({name} ignores sink mode, and MindFormers would "
                     "multiply the epochs)")
    precision = {}
    for key in PRECISIONS:
        want = str(getattr(ph.precision, key))
        got = effective_dtype(want, sup)
        if got != want:
            notes.append(f"precision.{key}: {want} -> {got} ({name} has no {want})")
        precision[key] = got
    flash = ph.use_flash_attention and sup.flash_attention
    if ph.use_flash_attention and not flash:
        notes.append(f"use_flash_attention: true -> false ({name} has no flash attention)")
    predict = ph.run_mode == "predict"
    g = ph.generation
    use_past = g.use_past and predict and (sup.kv_cache or not ph.export)
    cpu_kv_cache = use_past and not sup.kv_cache
    kv_blocks = g.num_blocks
    if g.use_past and predict and not use_past:
        notes.append(f"use_past: true -> false (the exported KV-cache graphs need Ascend's paged-attention kernels; "
                     f"{name} exports the full-sequence graph)")
    if cpu_kv_cache:
        # every sequence of a batch may grow to seq_length: the cache holds that, and no more
        kv_blocks = cache_blocks(ph.batch_size, exp.data.seq_length, g.block_size)
        notes.append(f"KV cache: MindFormers' paged-attention kernels are Ascend-only; {name} decodes against "
                     f"qwen15_exp's CPU cache (the same block tables and slot mapping; {kv_blocks} blocks of "
                     f"{g.block_size} = batch {ph.batch_size} x seq_length {exp.data.seq_length}); prompts padded to "
                     "the batch's longest only, prefill kernel by kernel, decode steps as one dynamic-shape graph")
    if not sup.semi_auto_parallel:
        notes.append(f"parallel.parallel_mode: 1 -> 0 (semi-auto parallel does not run on {name}; data parallel "
                     "only)")
    loss_scale, wrapper, optimizer = None, "MFTrainOneStepCell", ph.optimizer.type
    model_class = CPU_MODEL_CLASS if cpu_kv_cache else "LlamaForCausalLM"
    if ph.trains:
        if not sup.semi_auto_parallel:         # no layout shards the vocabulary
            notes.append(f"model: LlamaForCausalLM -> {CPU_MODEL_CLASS} (its loss is one LogSoftmax kernel; "
                         "MindFormers' cross entropy is built for sharded vocabularies from seven, 7x slower here)")
            model_class = CPU_MODEL_CLASS
        loss_scale = _loss_scale(ph.loss_scale, precision["compute"] == "float32", notes)
        if not sup.npu_overflow_status:
            notes.append(f"runner_wrapper: MFTrainOneStepCell -> {CPU_TRAIN_STEP_WRAPPER} (its overflow check has a "
                         "CPU kernel, NPUGetFloatStatusV2 none; it and the clipping norm are dot products here)")
            wrapper = CPU_TRAIN_STEP_WRAPPER
        if optimizer == "AdamW" and not sup.fused_adamw:
            notes.append(f"optimizer: AdamW -> {CPU_OPTIMIZER} (the same update through MindSpore's fused "
                         "AdamWeightDecay kernel; MindFormers' AdamW is ten element-wise kernels per parameter here)")
            optimizer = CPU_OPTIMIZER
    workers, cap = exp.data.num_parallel_workers, hw.max_dataset_workers
    if not predict and cap and workers > cap:
        notes.append(f"num_parallel_workers: {workers} -> {cap} (MindSpore allows at most one per core)")
        workers = cap
    return Adapted(precision=precision, flash_attention=flash, fused_rms_norm=sup.fused_rms_norm,
                   lazy_inline=sup.lazy_inline, sink_mode=sink, semi_auto_parallel=sup.semi_auto_parallel,
                   use_past=use_past, cpu_kv_cache=cpu_kv_cache, kv_blocks=kv_blocks, loss_scale=loss_scale, train_step_wrapper=wrapper, model_class=model_class,
                   optimizer=optimizer,
                   dataset_workers=workers,
                   numpy_sampling=predict and not sup.kv_cache, notes=tuple(notes))
