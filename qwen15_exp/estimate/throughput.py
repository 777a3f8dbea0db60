"""Throughput estimates from FLOPs, bytes and the hardware profile: no constant per model, row or recipe.

Training, per optimizer step and device:
    compute  = tokens x FLOPs/token / (devices x peak x compute_efficiency)
               FLOPs/token = 6 N_matmul + 6 L h s            (causal attention: half of 12 L h s;
                             LoRA: 4 N_matmul + 2 N_trainable, no weight gradients for frozen weights)
                             + 2 N_matmul + 2 L h s           (full recompute: one more forward)
    bubble   = compute x (pp - 1) / micro_batch_num           (1F1B pipeline)
    tp_comm  = sequence-parallel all-gathers / reduce-scatters of s b h activations, 4 per layer forward and
               4 backward (+2 recomputed), ring (t-1)/t, over the intra-node link, x (1 - comm_overlap)
    dp_comm  = gradient reduction 2 (d-1)/d x gradient bytes, over the link the data-parallel group spans,
               x (1 - comm_overlap)
    memory   = optimizer update (32 bytes per parameter) + fp32 logits passes, over HBM x memory_efficiency
    step     = compute + bubble + tp_comm + dp_comm + memory + step_overhead_ms
    tokens/s/p = tokens per step / step / devices
Predict (memory bound), at the batch it states (1 unless phase.batch_size says more):
    per token = (weights/mp + KV cache read) / (HBM bandwidth x memory_efficiency) + decode_overhead_ms
    prefill   = 2 N prompt / (mp x peak x compute_efficiency)
The constants (compute_efficiency, comm_overlap, memory_efficiency, decode_overhead_ms, step_overhead_ms)
live in the
hardware profile (`hardware.estimate`), each with its source or calibration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qwen15_exp.adapt import adapt
from qwen15_exp.estimate.memory import (DTYPE_BYTES, head_dim, kv_heads, layer_params, params_per_device,
                                       total_params, trainable_params)
from qwen15_exp.layout import layout_of


@dataclass(frozen=True)
class ThroughputEstimate:
    kind: str                       # train | predict
    tokens_per_s: float             # whole job
    tokens_per_s_per_device: float
    step_s: float
    terms_s: dict                   # the named terms of one step (train) or one token (predict)
    assumptions: str

    def as_dict(self) -> dict:
        return asdict(self)


def matmul_params(model) -> int:
    """Parameters that take part in matrix multiplies (the embedding lookup does not; lm_head does)."""
    return model.num_layers * layer_params(model) + model.vocab_size * model.hidden_size


def train_flops_per_token(exp) -> float:
    m, s = exp.model, exp.data.seq_length
    n, attn = matmul_params(m), m.num_layers * m.hidden_size * s
    # forward 2N, backward 2N for the activations' gradients and 2N for the weights' - only the trainable
    # ones under LoRA (frozen weights need no weight gradient)
    weight_grads = 2 * n if exp.phase.lora is None else 2 * min(n, trainable_params(m, exp.phase.lora))
    flops = 4 * n + weight_grads + 6 * attn
    if exp.phase.recompute.recompute:
        flops += 2 * n + 2 * attn
    elif exp.phase.recompute.select_recompute:
        flops += 2 * attn
    return flops


def memory_traffic_bytes(exp, layout) -> float:
    """Bytes a step moves outside matmuls: the optimizer update (weight, gradient and two AdamW moments,
    read and written: 32 bytes per fp32 parameter) and the fp32 logits of the loss (about 4 passes)."""
    p, m, L = exp.parallel, exp.model, layout
    shard = L.data_parallel if (p.enable_parallel_optimizer or p.optimizer_shard) else 1
    trainable_share = trainable_params(m, exp.phase.lora) / total_params(m)
    update = params_per_device(exp, L) * trainable_share / shard * 32
    micro_batches = L.global_batch / (exp.phase.batch_size * L.data_parallel)
    vocab_shard = 1 if p.vocab_emb_dp else L.model_parallel
    logits = 4 * 4 * exp.data.seq_length * exp.phase.batch_size * m.vocab_size / vocab_shard * micro_batches
    return update + logits


def peak_flops(exp, compute_dtype: str) -> float:
    return exp.hardware.peak_tflops.get(compute_dtype, 0.0) * 1e12


def constants(exp) -> dict:
    return dict(exp.hardware.estimate)


def estimate_train(exp, layout=None) -> ThroughputEstimate:
    hw, m, c, L = exp.hardware, exp.model, constants(exp), layout or layout_of(exp)
    dtype = adapt(exp).precision
    n_dev, gb, s = L.devices, L.global_batch, exp.data.seq_length
    tokens = gb * s
    peak = peak_flops(exp, dtype["compute"])
    # peak_tflops is per device; on a CPU it is the node's, shared by the workers msrun starts there
    workers_sharing = L.devices_here if hw.shared_node_compute else 1
    compute = tokens * train_flops_per_token(exp) / (n_dev * peak / workers_sharing * c["compute_efficiency"])
    bubble = compute * (L.pipeline_stage - 1) / L.micro_batch_num if L.pipeline_stage > 1 else 0.0
    act_bytes = DTYPE_BYTES[dtype["compute"]]
    t = L.model_parallel
    micro_batches = gb / (exp.phase.batch_size * L.data_parallel)
    tp = 0.0
    if t > 1:
        per_micro = s * exp.phase.batch_size * m.hidden_size * act_bytes * (t - 1) / t
        collectives = 8 + (2 if exp.phase.recompute.recompute else 0)
        layers_here = m.num_layers / L.pipeline_stage
        tp = collectives * per_micro * layers_here * micro_batches / (hw.intra_node_bandwidth_gbs * 1e9)
    dp = 0.0
    if L.data_parallel > 1:
        trainable_share = trainable_params(m, exp.phase.lora) / total_params(m)
        grad_bytes = params_per_device(exp, L) * trainable_share * DTYPE_BYTES[dtype["param_init"]]
        crosses_nodes = L.nodes > 1 and t * L.pipeline_stage < hw.devices_per_node * L.nodes
        bw = hw.inter_node_bandwidth_gbs if crosses_nodes else hw.intra_node_bandwidth_gbs
        dp = 2 * (L.data_parallel - 1) / L.data_parallel * grad_bytes / (bw * 1e9)
    exposed = 1.0 - c.get("comm_overlap", 0.0)
    memory = memory_traffic_bytes(exp, L) * workers_sharing / (
        hw.hbm_bandwidth_gbs * 1e9 * c.get("memory_efficiency", 1.0))
    overhead = c.get("step_overhead_ms", 0.0) / 1000
    step = compute + bubble + exposed * (tp + dp) + memory + overhead
    return ThroughputEstimate(
        kind="train", tokens_per_s=tokens / step, tokens_per_s_per_device=tokens / step / n_dev, step_s=step,
        terms_s={"compute": compute, "pipeline_bubble": bubble, "tensor_parallel_comm": exposed * tp,
                 "data_parallel_comm": exposed * dp, "memory_traffic": memory, "step_overhead": overhead},
        assumptions=f"global batch {gb} x seq {s}; peak {peak / 1e12:.0f} TFLOP/s "
                    f"({dtype['compute']}) x compute_efficiency {c['compute_efficiency']}")


def estimate_predict(exp, layout=None, prompt_tokens: int = 256, new_tokens: int = 256) -> ThroughputEstimate:
    hw, m, c, L = exp.hardware, exp.model, constants(exp), layout or layout_of(exp)
    adapted = adapt(exp)
    dtype, mp = adapted.precision, L.model_parallel
    peak = peak_flops(exp, dtype["compute"])
    batch = exp.phase.batch_size
    w_bytes = params_per_device(exp, L) * DTYPE_BYTES[dtype["param_init"]]
    kv_per_token = 2 * m.num_layers * kv_heads(m) * head_dim(m) * DTYPE_BYTES[dtype["compute"]]
    avg_context = prompt_tokens + new_tokens / 2
    kv_read = batch * avg_context * kv_per_token / mp
    mem_bw = hw.hbm_bandwidth_gbs * 1e9 * c["memory_efficiency"]
    decode = (w_bytes + kv_read) / mem_bw + c.get("decode_overhead_ms", 0.0) / 1000
    if not adapted.use_past:               # no KV cache (CPU): every token recomputes the whole context
        decode += 2 * matmul_params(m) * avg_context * batch / (mp * peak * c["compute_efficiency"])
    prefill = 2 * matmul_params(m) * prompt_tokens * batch / (mp * peak * c["compute_efficiency"])
    total = prefill + new_tokens * decode
    tps = batch * new_tokens / total
    return ThroughputEstimate(
        kind="predict", tokens_per_s=tps, tokens_per_s_per_device=tps / L.devices, step_s=decode,
        terms_s={"decode_per_token": decode, "prefill": prefill, "weights_read_per_token": w_bytes / mem_bw},
        assumptions=f"batch {batch}, prompt {prompt_tokens} + {new_tokens} new tokens, "
                    f"KV cache {'on' if adapted.use_past else 'off (full recompute per token)'}, "
                    f"HBM {hw.hbm_bandwidth_gbs:.0f} GB/s x memory_efficiency {c['memory_efficiency']}")


def estimate_throughput(exp, layout=None) -> ThroughputEstimate | None:
    if not exp.hardware.estimate or not exp.hardware.peak_tflops:
        return None
    if exp.phase.run_mode == "predict":
        return estimate_predict(exp, layout)
    if not exp.phase.trains:                  # eval: no throughput model for a forward-only pass yet
        return None
    return estimate_train(exp, layout)
