"""Throughput estimates from FLOPs, bytes and the hardware profile: no constant per model, row or recipe.

Training, per optimizer step and device:
    compute  = tokens x FLOPs/token / (devices x peak x compute_efficiency)
               FLOPs/token = 6 N_matmul + 6 L h s            (causal attention: half of 12 L h s;
                             LoRA: 4 N_matmul + 2 N_trainable, no weight gradients for frozen weights)
                             + 2 N_matmul + 2 L h s           (full recompute: one more forward)
    bubble   = one micro-batch through every stage but the slowest (1F1B fill and drain)
    tp_comm  = sequence-parallel all-gathers / reduce-scatters of s b h activations, 4 per layer forward and
               4 backward (+2 recomputed), ring (t-1)/t, over the intra-node link, x (1 - comm_overlap)
    dp_comm  = gradient reduction 2 (d-1)/d x gradient bytes, over the link the data-parallel group spans,
               x (1 - comm_overlap)
    memory   = optimizer update (32 bytes per parameter) + fp32 logits passes, over HBM x memory_efficiency
    step     = compute + bubble + tp_comm + dp_comm + memory + step_overhead_ms
    tokens/s/p = tokens per step / step / devices
Predict, at the run's batch b (phase.batch_size: the recipe's), which it states:
    decode step = max((weights/mp + b x context x KV bytes/token) / (memory bandwidth x memory_efficiency),
                      b x 2 N / mp / (peak x compute_efficiency))
                  + tensor-parallel all-reduces (2 per layer of b x h) + layers x kernels x kernel_launch_us
                  + decode_overhead_ms (the host's generate loop)
    prefill     = 2 N b prompt / (mp x peak x compute_efficiency) (+ causal attention)
    tokens/s    = b x new / (prefill + new x decode step)
  and, for a published row, the batch at which that equals the row ("implied batch"; the rows state none).
The constants (compute_efficiency, comm_overlap, memory_efficiency, decode_overhead_ms, step_overhead_ms)
live in the
hardware profile (`hardware.estimate`), each with its source or calibration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qwen15_exp.adapt import adapt
from qwen15_exp.estimate.memory import (DTYPE_BYTES, longest_prompt_tokens, embedding_params, head_dim, kv_heads, layer_params,
                                       params_per_device,
                                       recompute_kind, stage_layers, total_params, trainable_params)
from qwen15_exp.layout import layout_of, micro_batch_samples


@dataclass(frozen=True)
class ThroughputEstimate:
    kind: str                       # train | predict
    tokens_per_s: float             # whole job
    tokens_per_s_per_device: float
    step_s: float
    terms_s: dict                   # the named terms of one step (train) or one token (predict)
    assumptions: str
    uncertainty: float = 0.0        # +- share the figure may be off (the hardware's throughput_uncertainty)
    rank_resolution: float = 0.0    # layouts whose estimates are closer than this share rank equal
    batch: int | None = None        # predict: the batch the figure is for
    implied_batch: int | None = None  # predict: the batch at which the estimate equals the published row

    def as_dict(self) -> dict:
        return asdict(self)


def matmul_params(model) -> int:
    """Parameters that take part in matrix multiplies (the embedding lookup does not; lm_head does)."""
    return model.num_layers * layer_params(model) + model.vocab_size * model.hidden_size


def train_flops_per_token(exp) -> float:
    """Model FLOPs per trained token (the figure MFU is quoted in): 6 N + 6 L h s (causal attention, half of
    12 L h s); LoRA: no weight gradients for frozen weights; + one forward under full recompute."""
    m, s = exp.model, exp.data.seq_length
    n, attn = matmul_params(m), m.num_layers * m.hidden_size * s
    weight_grads = 2 * n if exp.phase.lora is None else 2 * min(n, trainable_params(m, exp.phase.lora))
    flops = 4 * n + weight_grads + 6 * attn
    if recompute_kind(exp.phase.recompute)[0]:     # the decoder layers' GEMMs backward reads once more (not
        flops += 2 * m.num_layers * recomputed_gemm_params(m) + 2 * attn   # lm_head); selective: element-wise
    return flops


def layer_gemms(m, t: int) -> list[tuple[int, int, bool]]:
    """(in, out, recomputed) of each Linear of a decoder layer as one device holds it under model parallel t.
    A full recompute redoes only the forward GEMMs whose outputs the backward reads: wo's and w2's outputs
    feed nothing but the residual adds, whose backward does not read them, so MindSpore's recompute pass
    (which duplicates the nodes that backward nodes use) leaves them out."""
    h, f, kv = m.hidden_size, m.intermediate_size, kv_heads(m) * head_dim(m)
    return [(h, h // t, True), (h, kv // t, True), (h, kv // t, True), (h // t, h, False),  # wq wk wv, wo
            (h, f // t, True), (h, f // t, True), (f // t, h, False)]        # w1 w3 (gate, up), w2 (down)


def recomputed_gemm_params(m) -> int:
    """Weights of the GEMMs a full recompute runs again (see layer_gemms), per layer."""
    return sum(k * n for k, n, again in layer_gemms(m, 1) if again)


def gemm_flops_bytes(rows: int, k: int, n: int, act_bytes: int) -> tuple[float, float]:
    """One GEMM [rows, k] x [k, n]: its FLOPs, and the bytes of its operands and result. The bytes are what
    make small models slow: at h = 1024 a GEMM moves 4x the bytes per FLOP of one at h = 4096."""
    return 2 * rows * k * n, (rows * k + k * n + rows * n) * act_bytes


def elementwise_passes(m, t: int, seq_parallel: bool) -> float:
    """Tensor elements one token reads or writes per layer forward outside the GEMMs and attention: two
    RMSNorms (2 h each), two residual adds (3 h each), q/k/v bias and rotary embedding (2 and 3 passes over
    q and k), attention's q, k, v in and out (4 h), SwiGLU (5 f: gate and up in, silu, product out).
    Under sequence parallel the h-wide ones run on 1/t of the tokens."""
    h, f, kv = m.hidden_size, m.intermediate_size, kv_heads(m) * head_dim(m)
    h_wide = 2 * 2 * h + 2 * 3 * h
    per_head = (2 * (h + 2 * kv) + 3 * (h + kv) + 2 * h + 2 * kv) / t
    return (h_wide / t if seq_parallel else h_wide) + per_head + 5 * f / t


KERNELS_PER_LAYER = 40        # forward kernels of a decoder layer in MindFormers' graph (GEMMs, norms, rope, ...)


@dataclass(frozen=True)
class StageWork:
    """One micro-batch's forward and backward through one pipeline stage, in seconds by what limits it."""
    matmul: float              # GEMM and attention FLOPs at the sustained rates
    memory: float              # bytes moved by GEMM operands and the element-wise operators
    launch: float              # kernel dispatch

    @property
    def seconds(self) -> float:
        return self.matmul + self.memory + self.launch


def layer_and_head_work(exp, layout, adapted, c: dict, peak: float, act_bytes: int) -> tuple[StageWork, StageWork]:
    """One micro-batch's forward and backward through one decoder layer, and through lm_head and the loss
    (the last stage's extra)."""
    m, ph, p = exp.model, exp.phase, exp.parallel
    t, s, b = layout.model_parallel, exp.data.seq_length, micro_batch_samples(exp)
    rows = s * b
    bandwidth = exp.hardware.hbm_bandwidth_gbs * 1e9 * c.get("memory_efficiency", 1.0)
    eff = c["compute_efficiency"]
    full, select = recompute_kind(ph.recompute)
    forwards = 2 if full else 1
    # backward: the activations' gradients (one GEMM per forward GEMM) and the weights' unless frozen (LoRA)
    backward_passes = 1 if ph.lora is not None else 2
    layer_flops = layer_bytes = 0.0
    for k, n, again in layer_gemms(m, t):
        gemm_passes = 1 + backward_passes + (1 if full and again else 0)
        f, by = gemm_flops_bytes(rows, k, n, act_bytes)
        layer_flops, layer_bytes = layer_flops + f * gemm_passes, layer_bytes + by * gemm_passes
    # causal attention: forward 2 b s^2 h / t FLOPs; a flash-attention backward recomputes the scores (2.5x
    # the forward), a plain one keeps them (2x) and moves the b a s^2 fp32 score matrix instead
    flash = adapted.flash_attention
    attn_flops = 2 * b * s * s * m.hidden_size / t * (forwards + (2.5 if flash else 2.0))
    if not flash:
        layer_bytes += b * m.num_heads / t * s * s * 4 * 4 * (forwards + 1)
    layer_bytes += rows * elementwise_passes(m, t, p.use_seq_parallel and t > 1) * act_bytes * (forwards + 2)
    if select:                                   # SwiGLU's silu and product once more
        layer_bytes += rows * 3 * m.intermediate_size / t * act_bytes
    layer = StageWork(
        matmul=layer_flops / (peak * eff) + attn_flops / (peak * eff * c.get("attention_efficiency", 1.0)),
        memory=layer_bytes / bandwidth,
        launch=KERNELS_PER_LAYER * (forwards + 2) * c.get("kernel_launch_us", 0.0) / 1e6)
    # lm_head (forward and two backward GEMMs: recompute redoes decoder layers only), and the fp32 logits of
    # the loss (about 4 passes)
    vocab = m.vocab_size // (1 if p.vocab_emb_dp else t)
    f, by = gemm_flops_bytes(rows, m.hidden_size, vocab, act_bytes)
    head = StageWork(matmul=f * 3 / (peak * eff), memory=(by * 3 + 4 * 4 * rows * vocab) / bandwidth, launch=0.0)
    return layer, head


def stage_works(exp, layout, adapted, c: dict, peak: float, act_bytes: int) -> list[StageWork]:
    """Each pipeline stage: its layers (with `offset`), lm_head on the last."""
    layer, head = layer_and_head_work(exp, layout, adapted, c, peak, act_bytes)
    layers = stage_layers(exp.model.num_layers, layout.pipeline_stage, exp.parallel.offset)
    last = len(layers) - 1
    return [StageWork(matmul=n * layer.matmul + (head.matmul if i == last else 0.0),
                      memory=n * layer.memory + (head.memory if i == last else 0.0), launch=n * layer.launch)
            for i, n in enumerate(layers)]


FUSED_ADAMW_BYTES_PER_PARAM = 32          # fp32 weight, gradient and two moments, each read and written once


def optimizer_traffic_bytes(exp, layout) -> float:
    """The optimizer update on the device's shard of the trainable parameters: a fused AdamW reads and writes
    the weight, gradient and two moments once (32 bytes per fp32 parameter); where the gradient is also passed
    over by slow element-wise kernels (on the CPU: the loss-scale and clipping multiplies, the norm, the tied
    embedding's gradient sum) the profile's `optimizer_bytes_per_param` says how many bytes that costs."""
    p, m = exp.parallel, exp.model
    shard = layout.data_parallel if (p.enable_parallel_optimizer or p.optimizer_shard) else 1
    trainable_share = trainable_params(m, exp.phase.lora) / total_params(m)
    bytes_per_param = exp.hardware.estimate.get("optimizer_bytes_per_param", FUSED_ADAMW_BYTES_PER_PARAM)
    return params_per_device(exp, layout) * trainable_share / shard * bytes_per_param


def tp_comm_hidden(parallel) -> bool:
    """Whether the sequence-parallel collectives can hide behind compute. Each one sits between two GEMMs of
    the same micro-batch (all-gather before q/k/v and gate/up, reduce-scatter after wo and down): nothing
    else is ready to run while it moves, unless the layer is split in two that take turns
    (fine_grain_interleave) or two half micro-batches are interleaved (micro_batch_interleave_num)."""
    return parallel.fine_grain_interleave > 1 or parallel.micro_batch_interleave_num > 1


def peak_flops(exp, compute_dtype: str) -> float:
    return exp.hardware.peak_tflops.get(compute_dtype, 0.0) * 1e12


def constants(exp) -> dict:
    return dict(exp.hardware.estimate)


def stated_error(exp) -> tuple[float, float]:
    """(uncertainty, rank_resolution) of the hardware's training estimates: +- the share a figure may be off,
    and the share below which two layouts' estimates are not ordered."""
    c = exp.hardware.estimate
    return c.get("throughput_uncertainty", 0.0), c.get("rank_resolution", 0.0)


def estimate_train(exp, layout=None, adapted=None) -> ThroughputEstimate:
    """A training step's time, term by term, on the layout and adaptations a run computed (or computes here)."""
    hw, m, c, L = exp.hardware, exp.model, constants(exp), layout or layout_of(exp)
    adapted = adapted or adapt(exp)
    dtype = adapted.precision
    n_dev, gb, s = L.devices, L.global_batch, exp.data.seq_length
    tokens = gb * s
    # peak_tflops is per device; on a CPU it is the node's, shared by the workers msrun starts there
    workers_sharing = L.devices_here if hw.shared_node_compute else 1
    peak = peak_flops(exp, dtype["compute"]) / workers_sharing
    act_bytes = DTYPE_BYTES[dtype["compute"]]
    # the workers of a CPU node share its memory bandwidth as they share its cores
    shared = dict(c, memory_efficiency=c.get("memory_efficiency", 1.0) / workers_sharing)
    micro_batches = gb // (micro_batch_samples(exp) * L.data_parallel)
    stages = stage_works(exp, L, adapted, shared, peak, act_bytes)
    slowest = max(stages, key=lambda w: w.seconds)
    # 1F1B: every micro-batch passes the slowest stage; filling and draining the pipeline once a step adds one
    # micro-batch's pass through each of the other stages
    bubble = sum(w.seconds for w in stages) - slowest.seconds
    t = L.model_parallel
    tp = 0.0
    if t > 1:
        per_micro = s * micro_batch_samples(exp) * m.hidden_size * act_bytes * (t - 1) / t
        collectives = 8 + (2 if recompute_kind(exp.phase.recompute)[0] else 0)
        layers_here = max(stage_layers(m.num_layers, L.pipeline_stage, exp.parallel.offset))
        tp = collectives * per_micro * layers_here * micro_batches / (hw.intra_node_bandwidth_gbs * 1e9)
    dp = 0.0
    if L.data_parallel > 1:
        trainable_share = trainable_params(m, exp.phase.lora) / total_params(m)
        grad_bytes = params_per_device(exp, L) * trainable_share * DTYPE_BYTES[dtype["param_init"]]
        crosses_nodes = L.nodes > 1 and t * L.pipeline_stage < hw.devices_per_node * L.nodes
        bw = hw.inter_node_bandwidth_gbs if crosses_nodes else hw.intra_node_bandwidth_gbs
        ring = (L.data_parallel - 1) / L.data_parallel
        if exp.parallel.enable_parallel_optimizer or exp.parallel.optimizer_shard:
            # the parallel optimizer: gradients reduce-scattered (half an all-reduce), and the updated weight
            # shards all-gathered in the compute dtype before the next forward
            weight_bytes = params_per_device(exp, L) * DTYPE_BYTES[dtype["compute"]]
            dp = ring * (grad_bytes + weight_bytes) / (bw * 1e9)
        else:
            dp = 2 * ring * grad_bytes / (bw * 1e9)
    exposed = 1.0 - c.get("comm_overlap", 0.0)
    tp_exposed = exposed if tp_comm_hidden(exp.parallel) else 1.0
    compute = micro_batches * slowest.matmul
    memory = micro_batches * slowest.memory + optimizer_traffic_bytes(exp, L) * workers_sharing / (
        hw.hbm_bandwidth_gbs * 1e9 * c.get("memory_efficiency", 1.0))
    overhead = micro_batches * slowest.launch + c.get("step_overhead_ms", 0.0) / 1000
    step = compute + bubble + tp_exposed * tp + exposed * dp + memory + overhead
    uncertainty, rank_resolution = stated_error(exp)
    return ThroughputEstimate(
        kind="train", tokens_per_s=tokens / step, tokens_per_s_per_device=tokens / step / n_dev, step_s=step,
        terms_s={"compute": compute, "pipeline_bubble": bubble, "tensor_parallel_comm": tp_exposed * tp,
                 "data_parallel_comm": exposed * dp, "memory_traffic": memory, "launch_overhead": overhead},
        uncertainty=uncertainty, rank_resolution=rank_resolution,
        assumptions=f"global batch {gb} x seq {s}; peak {peak * workers_sharing / 1e12:.3g} TFLOP/s "
                    f"({dtype['compute']}) x compute_efficiency {c['compute_efficiency']}; model FLOPs "
                    f"utilisation {tokens / step / n_dev * train_flops_per_token(exp) / (peak * workers_sharing):.0%}")


PREDICT_PROMPT_TOKENS = 256
PREDICT_NEW_TOKENS = 256


def decode_step_terms(exp, L, adapted, c: dict, batch: int, context: float) -> dict:
    """One decode step of `batch` sequences at `context` cached positions, term by term (seconds): the weights
    and the KV cache read at the memory rate, or the step's compute where that is slower (a GEMM reads its
    weights once for the whole batch), the tensor-parallel all-reduces of every layer (two per layer, each
    batch x hidden), and a fixed cost per step: kernel launches per layer and the host's loop."""
    hw, m = exp.hardware, exp.model
    dtype, mp = adapted.precision, L.model_parallel
    act = DTYPE_BYTES[dtype["compute"]]
    weights = params_per_device(exp, L) * DTYPE_BYTES[dtype["param_init"]]
    kv_per_token = 2 * m.num_layers * kv_heads(m) * head_dim(m) * act / mp
    bandwidth = hw.hbm_bandwidth_gbs * 1e9 * c.get("decode_memory_efficiency", c["memory_efficiency"])
    memory = (weights + batch * context * kv_per_token) / bandwidth
    flops = 2 * matmul_params(m) / mp * batch + 4 * batch * context * m.hidden_size * m.num_layers / mp
    compute = flops / (peak_flops(exp, dtype["compute"]) * c.get("decode_compute_efficiency", c["compute_efficiency"]))
    tp = 0.0
    if mp > 1:
        per_reduce = 2 * (mp - 1) / mp * batch * m.hidden_size * act
        tp = 2 * m.num_layers * per_reduce / (hw.intra_node_bandwidth_gbs * 1e9)
    launch_us = c.get("decode_kernel_launch_us", c.get("kernel_launch_us", 0.0))
    launches = m.num_layers * KERNELS_PER_LAYER * launch_us / 1e6
    host = c.get("decode_overhead_ms", 0.0) / 1000
    return {"weights_and_cache": memory, "compute": compute, "tensor_parallel_comm": tp, "launches": launches,
            "host": host}


def decode_step_s(terms: dict) -> float:
    return max(terms["weights_and_cache"], terms["compute"]) + terms["tensor_parallel_comm"] + terms["launches"] + \
        terms["host"]


def predict_tokens_per_s(exp, L, adapted, c: dict, batch: int, prompt_tokens: int, new_tokens: int) -> tuple:
    """(tokens/s over every sequence, prefill s, mean decode step s, decode terms at the mean context)."""
    m = exp.model
    dtype, mp = adapted.precision, L.model_parallel
    peak = peak_flops(exp, dtype["compute"]) * c.get("prefill_compute_efficiency", c["compute_efficiency"])
    # the prefill is compute: every prompt position through every GEMM, and causal attention; lm_head only for
    # the last position
    prefill_flops = (2 * (matmul_params(m) - embedding_params(m)) * prompt_tokens
                     + 2 * m.num_layers * prompt_tokens ** 2 * m.hidden_size + 2 * embedding_params(m)) * batch / mp
    prefill = prefill_flops / peak
    if not adapted.use_past:
        # no KV cache: every token runs the whole network over the input padded to seq_length, lm_head included
        full_pass = 2 * matmul_params(m) * exp.data.seq_length * batch / (mp * peak)
        step = full_pass + c.get("decode_overhead_ms", 0.0) / 1000
        return batch * new_tokens / (full_pass + new_tokens * step), full_pass, step, {"full_pass": full_pass}
    terms = decode_step_terms(exp, L, adapted, c, batch, prompt_tokens + new_tokens / 2)
    step = decode_step_s(terms)
    return batch * new_tokens / (prefill + new_tokens * step), prefill, step, terms


def implied_batch(exp, L, adapted, c: dict, figure: float, prompt_tokens: int, new_tokens: int,
                  devices: int, per_device: bool, limit: int = 4096) -> int | None:
    """The batch at which the estimate equals a published figure (the figures do not state theirs), or None
    when no batch up to `limit` reaches it."""
    def rate(b):
        tps = predict_tokens_per_s(exp, L, adapted, c, b, prompt_tokens, new_tokens)[0]
        return tps / devices if per_device else tps
    if rate(limit) < figure:
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if rate(mid) >= figure:
            hi = mid
        else:
            lo = mid + 1
    return lo


def estimate_predict(exp, layout=None, adapted=None, prompt_tokens: int = PREDICT_PROMPT_TOKENS,
                     new_tokens: int = PREDICT_NEW_TOKENS) -> ThroughputEstimate:
    """Generation at the run's batch (phase.batch_size: the recipe's), prefill and decode apart. Where the
    run reproduces a published row, also the batch at which the estimate equals the row ("implied batch")."""
    hw, c, L = exp.hardware, constants(exp), layout or layout_of(exp)
    adapted = adapted or adapt(exp)
    batch = exp.phase.batch_size
    tps, prefill, step, terms = predict_tokens_per_s(exp, L, adapted, c, batch, prompt_tokens, new_tokens)
    implied = None
    ref = exp.reference or {}
    if ref.get("figure"):
        per_device = str(ref.get("unit", "")).endswith("/p")
        implied = implied_batch(exp, L, adapted, c, float(ref["figure"]), prompt_tokens, new_tokens, L.devices,
                                per_device)
    cache = ("on" if adapted.use_past else f"off (every token recomputes {exp.data.seq_length} positions)")
    return ThroughputEstimate(
        kind="predict", tokens_per_s=tps, tokens_per_s_per_device=tps / L.devices, step_s=step,
        terms_s={"prefill": prefill, "decode_step": step, **{f"decode_{k}": v for k, v in terms.items()}},
        uncertainty=c.get("predict_uncertainty", 0.0), batch=batch, implied_batch=implied,
        assumptions=f"batch {batch}, prompt {prompt_tokens} + {new_tokens} new tokens, KV cache {cache}, "
                    f"memory {hw.hbm_bandwidth_gbs:.0f} GB/s x memory_efficiency {c['memory_efficiency']}")


def predict_lengths(exp) -> tuple[int, int]:
    """(prompt, new tokens) the estimate assumes: a published row's are not stated (256 + 256 assumed); a run
    with its prompts on the command line is sized by them (their byte length bounds their tokens) and by
    max_new_tokens (else max_decode_length less the prompt, as MindFormers reads them)."""
    ph = exp.phase
    if exp.reference or not ph.predict_data or ph.chat:
        return PREDICT_PROMPT_TOKENS, PREDICT_NEW_TOKENS
    prompt = longest_prompt_tokens(exp)
    return prompt, ph.generation.max_new_tokens or max(1, ph.generation.max_decode_length - prompt)


def estimate_throughput(exp, layout=None, adapted=None) -> ThroughputEstimate | None:
    if not exp.hardware.estimate or not exp.hardware.peak_tflops:
        return None
    if exp.phase.run_mode == "predict":
        return estimate_predict(exp, layout, adapted, *predict_lengths(exp))
    if not exp.phase.trains:                  # eval: no throughput model for a forward-only pass yet
        return None
    return estimate_train(exp, layout, adapted)
