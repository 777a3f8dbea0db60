"""Per-device memory estimate of a run (bytes), from first principles.

Parameters count exactly as MindFormers' LlamaForCausalLM builds them (q/k/v bias, grouped KV heads,
tied embeddings). Training state: weights in param_init dtype, gradients in the same dtype, AdamW's two
fp32 moments; tensor parallel shards the layer weights by mp and the embedding/lm_head by mp unless
vocab_emb_dp; pipeline stages hold their own layers (with offsets); the parallel optimizer shards
weights, gradients and optimizer state by dp. Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models"): per layer s*b*h*(34 + 5*a*s/h) bytes at 16-bit, divided by t with sequence
parallel, the 5as/h score term gone under flash attention, 2sbh per layer under full recompute; a
pipeline's first stage keeps pp micro-batches in flight.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qwen15_exp.adapt import adapt
from qwen15_exp.layout import layout_of, micro_batch_samples

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GB = 2**30


def head_dim(model) -> int:
    return model.hidden_size // model.num_heads


def kv_heads(model) -> int:
    return model.n_kv_heads or model.num_heads


def layer_params(model) -> int:
    h, f = model.hidden_size, model.intermediate_size
    kv = kv_heads(model) * head_dim(model)
    bias = h + 2 * kv if model.qkv_has_bias else 0
    attention = h * h + 2 * h * kv + h * h + bias
    mlp = 3 * h * f
    norms = 2 * h
    return attention + mlp + norms


def embedding_params(model) -> int:
    return model.vocab_size * model.hidden_size


def total_params(model) -> int:
    lm_head = 0 if model.tie_word_embeddings else embedding_params(model)
    return embedding_params(model) + model.num_layers * layer_params(model) + model.hidden_size + lm_head


def recompute_kind(recompute) -> tuple[bool, bool]:
    """(full, selective) as the recipes' MindFormers applies them: a whole layer is recomputed only `if
    recompute and not select_recompute` (models/utils.py set_layer_stage_recompute, the MindFormers of the
    published tables); selective recompute is SwiGLU's silu and product."""
    return bool(recompute.recompute) and not recompute.select_recompute, bool(recompute.select_recompute)


def lora_targets(model, lora) -> dict[str, tuple]:
    """The Linear weights LoRA wraps: MindFormers matches `target_modules` against each cell's attribute name
    (wq in model.layers.0.attention.wq)."""
    import re
    from qwen15_exp.weights.shapes import expected_shapes
    pattern = re.compile(lora.target_modules)
    return {name: shape for name, shape in expected_shapes(model).items()
            if name.endswith(".weight") and len(shape) == 2 and "embedding" not in name
            and pattern.match(name.split(".")[-2])}


def trainable_params(model, lora) -> int:
    """Parameters that get gradients and optimizer state: all of them, or with LoRA the adapters (rank x (in +
    out) per wrapped Linear) and whatever `lora.trainable` keeps trainable (fnmatch patterns, as MindFormers'
    freeze_exclude)."""
    if lora is None:
        return total_params(model)
    from fnmatch import fnmatch

    from qwen15_exp.weights.shapes import expected_shapes
    adapters = sum(lora.rank * (shape[0] + shape[1]) for shape in lora_targets(model, lora).values())
    kept = sum(_count(shape) for name, shape in expected_shapes(model).items()
               if any(fnmatch(name, pattern) for pattern in lora.trainable))
    return adapters + kept


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def stage_layers(num_layers: int, pp: int, offset) -> list[int]:
    """Layers per pipeline stage: an even split plus MindFormers' offset (int or one entry per stage)."""
    base = [num_layers // pp] * pp
    for i in range(num_layers % pp):              # MindFormers puts the remainder on the last stages
        base[pp - 1 - i] += 1
    if isinstance(offset, (list, tuple)):
        if len(offset) != pp or not all(isinstance(o, int) for o in offset):
            return base                    # malformed: validate() reports it; estimate without it
        return [b + o for b, o in zip(base, offset)]
    return [b + offset for b in base] if isinstance(offset, int) else base


@dataclass(frozen=True)
class MemoryEstimate:
    """The fullest device's memory: the pipeline stage that needs most (its layers with `offset`, the
    embedding on the first stage, lm_head on the last, the micro-batches in flight there)."""
    params_per_device: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    kv_cache_gb: float
    total_gb: float
    budget_gb: float
    uncertainty: float = 0.0          # +- share of total_gb the estimate may be off (hardware.estimate)
    stage: int = 0                    # the pipeline stage this is (0 with one stage)
    runtime_gb: float = 0.0           # generation on a CPU: the process itself and the weights' load copy

    @property
    def fits(self) -> bool:
        """Over budget only beyond the estimate's uncertainty: a layout within it is warned about, not
        rejected (no official recipe may be refused by our own estimate)."""
        return self.budget_gb <= 0 or self.total_gb * (1 - self.uncertainty) <= self.budget_gb

    @property
    def tight(self) -> bool:
        """Fits only within the uncertainty: worth a warning."""
        return self.fits and self.budget_gb > 0 and self.total_gb > self.budget_gb

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fits"], d["tight"] = self.fits, self.tight
        return d


def parse_gb(text: str) -> float:
    """'58GB' -> 58.0; '' -> 0."""
    if not text:
        return 0.0
    t = str(text).strip().upper().replace(" ", "")
    try:
        for unit, scale in (("GB", 1.0), ("G", 1.0), ("MB", 1 / 1024), ("TB", 1024.0)):
            if t.endswith(unit):
                return float(t[: -len(unit)]) * scale
        return float(t)
    except ValueError:
        from qwen15_exp.errors import UserError
        raise UserError(f"hardware.max_device_memory={text!r} is not a memory size; write it as MindSpore "
                        "does, e.g. 58GB") from None


def stage_params(exp, layout, stage: int) -> int:
    """Parameters one device of pipeline stage `stage` holds: its layers / mp, the embedding on the first
    stage and lm_head on the last (/ mp unless vocab_emb_dp; tied weights are one matrix on one stage)."""
    m, p, L = exp.model, exp.parallel, layout
    layers = stage_layers(m.num_layers, L.pipeline_stage, p.offset)[stage]
    emb = embedding_params(m) / (1 if p.vocab_emb_dp else L.model_parallel)
    first, last = stage == 0, stage == L.pipeline_stage - 1
    heads = emb * ((1 if first else 0) + (1 if last and not m.tie_word_embeddings else 0))
    if m.tie_word_embeddings and last and not first:
        heads += emb                         # a pipeline keeps a copy of the tied matrix for lm_head
    return int(layers * layer_params(m) / L.model_parallel + heads + (m.hidden_size if last else 0))


def params_per_device(exp, layout=None) -> int:
    """Parameters of the fullest pipeline stage."""
    L = layout or layout_of(exp)
    return max(stage_params(exp, L, i) for i in range(L.pipeline_stage))


def layer_activation_bytes(s: int, b: int, m, t: int, seq_parallel: bool, flash: bool, selective: bool,
                           full_recompute: bool, dtype_bytes: int = 2) -> float:
    """Bytes one Qwen decoder layer keeps for the backward pass, counted as Korthikanti et al. 2022 count
    GPT's 34 sbh, for this architecture (no dropout, RMSNorm, SwiGLU, grouped KV heads), in elements of
    s b: the two norms' inputs (2 h), the q/k/v GEMMs' input (h), q, k, v (h + 2 kv) and the attention
    output (h), the MLP's input (h), gate, up, silu and product (4 f). Under sequence parallel the h-wide
    tensors outside the model-parallel region (norm inputs, GEMM inputs) are 1/t; q/k/v, attention and
    the f-wide ones always are. Without flash attention the b a s^2 scores add softmax and its input
    (5 bytes per score at 16 bit, as in the paper). Selective recompute (MindFormers': SwiGLU's silu and
    product) drops 2 f; full recompute keeps the layer input alone."""
    h, f, kv = m.hidden_size, m.intermediate_size, kv_heads(m) * head_dim(m)
    outside = (2 * h + h + h) / (t if seq_parallel else 1)     # norm inputs, q/k/v input, MLP input
    if full_recompute:
        return s * b * h * dtype_bytes / (t if seq_parallel else 1)
    inside = (h + 2 * kv + h + (2 if selective else 4) * f) / t
    scores = 0 if flash else 5 / 2 * m.num_heads * s / t
    return s * b * ((outside + inside) * dtype_bytes + scores * dtype_bytes)


def activation_bytes(exp, layout, flash: bool, dtype_bytes: int, stage: int = 0) -> float:
    """Activations stage `stage` keeps: its layers x the micro-batches in flight there under 1F1B (pp - stage:
    the first stage holds pp of them), + the fp32 logits on the last stage."""
    m, p, ph, L = exp.model, exp.parallel, exp.phase, layout
    s, b = exp.data.seq_length, micro_batch_samples(exp)
    t = L.model_parallel
    layers = stage_layers(m.num_layers, L.pipeline_stage, p.offset)[stage]
    full, selective = recompute_kind(ph.recompute)
    per_layer = layer_activation_bytes(s, b, m, t, p.use_seq_parallel and t > 1, flash, selective, full,
                                       dtype_bytes)
    in_flight = min(L.pipeline_stage - stage, L.micro_batch_num) if L.pipeline_stage > 1 else 1
    last = stage == L.pipeline_stage - 1
    logits = 4 * s * b * m.vocab_size / (1 if p.vocab_emb_dp else t) if last else 0
    return per_layer * layers * in_flight + logits


def kv_cache_bytes(exp, layout, adapted, dtype_bytes: int) -> float:
    """The paged cache the network allocates: every block, used or not (the CPU's sized to batch x seq_length)."""
    m, g = exp.model, exp.phase.generation
    tokens = adapted.kv_blocks * g.block_size if adapted.use_past else 0
    return 2 * m.num_layers * tokens * kv_heads(m) * head_dim(m) * dtype_bytes / layout.model_parallel


def longest_prompt_tokens(exp) -> int:
    """A bound on the prefill's length. Chat's history may fill seq_length; prompts given in
    phase.predict_data are at most their UTF-8 bytes long in tokens (a byte-level BPE token covers at least one
    byte), so `predict model=0_5b` with a short prompt is not sized as an 8192-token prefill."""
    ph, s = exp.phase, exp.data.seq_length
    if ph.predict_data and not ph.chat:
        return max(1, min(s, max(len(p.encode()) for p in ph.predict_data)))
    return s


def generation_activation_bytes(exp, layout, flash: bool, dtype_bytes: int) -> float:
    """The largest transient of a forward pass without training: a prefill of batch x the longest prompt
    (longest_prompt_tokens), its attention scores and softmax (batch x heads x prompt^2, twice), the layer's
    hidden-wide and MLP-wide tensors, and the logits of the last positions. Flash attention keeps no scores."""
    m, b, s = exp.model, exp.phase.batch_size, longest_prompt_tokens(exp)
    t = layout.model_parallel
    scores = 0 if flash else 2 * b * m.num_heads / t * s * s
    hidden = b * s * (6 * m.hidden_size + 3 * m.intermediate_size / t)
    logits = b * m.vocab_size / t
    return (scores + hidden + logits) * dtype_bytes


def estimate_memory(exp, layout=None, adapted=None) -> MemoryEstimate:
    """Per-device memory of the run as the target hardware will execute it (after the adaptations); a run
    hands in the layout and adaptations it computed once."""
    return _estimate(exp, layout or layout_of(exp), adapted or adapt(exp))


def _estimate(exp, layout, adapted) -> MemoryEstimate:
    return max((_stage_estimate(exp, layout, adapted, i) for i in range(layout.pipeline_stage)),
               key=lambda e: e.total_gb)


def _stage_estimate(exp, layout, adapted, stage: int) -> MemoryEstimate:
    ph, p = exp.phase, exp.parallel
    n = stage_params(exp, layout, stage)
    # with LoRA the frozen weights get no gradients or optimizer state; the adapters shard like their layers
    n_train = round(trainable_params(exp.model, ph.lora) * n / total_params(exp.model))
    adapters = n_train if ph.lora is not None else 0
    w_bytes = DTYPE_BYTES[adapted.precision["param_init"]]
    act_bytes = DTYPE_BYTES[adapted.precision["compute"]]
    training = ph.trains
    # MindSpore's parallel optimizer keeps only a 1/dp slice of every weight, its gradient and its
    # optimizer state on each device (weights are all-gathered for compute, gradients reduce-scattered)
    shard = layout.data_parallel if (training and (p.enable_parallel_optimizer or p.optimizer_shard)) else 1
    # ... but only the weights the optimizer updates: MindSpore's parallel pass gives no optimizer shard to a
    # parameter without requires_grad ("only trainable parameters need parallel optimizer", step_parallel.cc),
    # so LoRA's frozen base model stays whole on every device
    frozen = n + adapters - n_train
    weights = frozen * w_bytes + n_train * w_bytes / shard
    # accumulating over micro-batches (pipeline or gradient accumulation) keeps whole gradients: qwen15_exp
    # writes the recipes' gradient_accumulation_shard: false, so the parallel optimizer does not shard them
    accumulates = layout.pipeline_stage > 1 or ph.gradient_accumulation_steps > 1
    grads = n_train * w_bytes / (1 if accumulates else shard) if training else 0
    optimizer = n_train * 8 / shard if training else 0
    acts = activation_bytes(exp, layout, adapted.flash_attention, act_bytes, stage) if training else 0
    kv = kv_cache_bytes(exp, layout, adapted, act_bytes) if ph.run_mode == "predict" else 0
    runtime = 0.0
    if not training:
        acts = generation_activation_bytes(exp, layout, adapted.flash_attention, act_bytes)
        if ph.run_mode == "predict" and exp.hardware.device_target == "CPU":
            # the process (MindSpore, MindFormers, their libraries) and, while the weights load, their copy
            runtime = float(exp.hardware.estimate.get("process_gb", 0.0)) * GB + weights
    total = weights + grads + optimizer + acts + kv + runtime
    budget = parse_gb(exp.hardware.max_device_memory) or exp.hardware.device_memory_gb
    return MemoryEstimate(
        params_per_device=n, weights_gb=weights / GB, gradients_gb=grads / GB, optimizer_gb=optimizer / GB,
        activations_gb=acts / GB, kv_cache_gb=kv / GB, total_gb=total / GB, budget_gb=float(budget),
        uncertainty=float(exp.hardware.estimate.get("memory_uncertainty", 0.0)), stage=stage, runtime_gb=runtime / GB)


def cpu_run_bytes(exp, cpu_profile) -> float:
    """Bytes one CPU worker needs for this run as the cpu profile would run it (used to decide hardware=auto):
    fp32 training state for training, weights, KV cache and prefill for generation."""
    from copy import deepcopy
    probe = deepcopy(exp)
    probe.hardware = deepcopy(cpu_profile)
    return _estimate(probe, layout_of(probe), adapt(probe)).total_gb * GB
