"""KV-cache generation on the CPU, inside MindFormers' own `generate` loop.

MindFormers' legacy Llama decodes with a paged KV cache (use_past): the prompt once (prefill), then one
position per step against the cache, the host keeping each sequence's block table and slot mapping
(mindformers.modules.block_tables.BlockTables). Its attention cell (InferAttention) does that with Ascend
kernels only: ApplyRotaryPosEmb, ReshapeAndCache and PagedAttention. This module gives the network CPU
implementations of those three pieces and nothing else; the generate loop, the block manager, the logits
processors and the sampling stay MindFormers':

- CPUPagedAttentionMgr: PagedAttentionMgr's interface. `construct` writes the step's keys and values into the
  cache rows their slots name (ScatterUpdate; a padded position's slot -1 goes to a spare row), `paged_attn`
  gathers each sequence's blocks by its block table and attends the new query over its valid positions.
- CPUInferAttention: InferAttention with rotary embedding from Mul/Concat, prefill attention on the step's own
  keys and values (causal), and decode attention through the manager above. Grouped KV heads are attended
  in groups (no repeated keys).
- CPUCausalMask: no mask at all (the attention makes the prefill's, for the prompt's length); MindFormers'
  builds a seq_length x seq_length constant at construction (256 MB at the 0.5B's 8192).

Shapes: the prefill takes the prompts right-padded to the longest of the batch only, never to seq_length
(CPULlamaForCausalLM.prepare_inputs_for_generation), and a decode step reads only the cache blocks in use
(block tables trimmed to the longest sequence). The decode steps run as one GRAPH-mode graph with dynamic shapes
(MindFormers' is_dynamic inputs): one compile for every batch and context, kept by the compile cache. Measured on
the 0.5B shape (batch 1 / 8, 64 new tokens): decode 5.8 / 18.7 tokens/s in GRAPH mode against 2.4 / 11.6 in
PyNative, whose per-kernel dispatch costs more than the compile. The prefill runs in PyNative
(CPULlamaForCausalLM._incremental_infer): a dynamic-shape CPU graph keeps every intermediate tensor until the pass
ends (a 0.5B prefill of 8 x 460 tokens passed 24 GB), PyNative frees each as it goes and needs no compile; the
prefill is a few large GEMMs, where dispatch costs little. The same cells run in both.
"""
from __future__ import annotations

import contextlib
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn
from mindspore import ops
from mindspore.common.initializer import initializer
from mindspore.ops import operations as P

NEG_INF = -1e9


class CPUPagedAttentionMgr(nn.Cell):
    """The paged KV cache of one attention layer: rows of (kv heads x head dim) addressed by slot."""

    def __init__(self, n_heads, head_dim, n_kv_heads, kv_shape, seq_length=-1, compute_dtype=ms.float32,
                 parallel_decoding=False, chunk_prefill=False):
        super().__init__()
        if parallel_decoding or chunk_prefill:
            raise ValueError("parallel decoding and chunked prefill are not implemented on the CPU")
        num_blocks, block_size = int(kv_shape[0]), int(kv_shape[1])
        self.n_heads, self.head_dim, self.n_kv_heads = n_heads, head_dim, n_kv_heads
        self.n_rep = n_heads // n_kv_heads
        self.block_size = block_size
        self.spare_slot = num_blocks * block_size            # padded positions write here, never read
        self.seq_length = seq_length
        self.is_first_iteration = True
        self.scale_value = 1 / math.sqrt(head_dim)
        rows = (self.spare_slot + 1, n_kv_heads * head_dim)
        self.key_cache = Parameter(initializer("zeros", rows, compute_dtype), name="key_cache", requires_grad=False)
        self.value_cache = Parameter(initializer("zeros", rows, compute_dtype), name="value_cache",
                                     requires_grad=False)
        self.scatter = P.ScatterUpdate()
        self.gather = P.Gather()
        self.bmm_qk = P.BatchMatMul(transpose_b=True)
        self.bmm = P.BatchMatMul()
        self.softmax = P.Softmax()
        self.offsets = ms.Tensor(np.arange(block_size, dtype=np.int32))

    def slots_of(self, slot_mapping):
        return ops.where(slot_mapping < 0, ops.full_like(slot_mapping, self.spare_slot), slot_mapping)

    def construct(self, key, value, slot_mapping, batch_valid_length=None):
        """Write the keys and values of the step's positions ([B, S, kv heads x head dim]) at their slots."""
        width = self.n_kv_heads * self.head_dim
        slots = self.slots_of(slot_mapping.reshape(-1))
        k = self.scatter(self.key_cache, slots, key.reshape(-1, width))
        v = self.scatter(self.value_cache, slots, value.reshape(-1, width))
        return ops.depend(k, v)

    def paged_attn(self, query, batch_valid_length, block_tables, attn_mask=None, q_seq_lens=None):
        """One new query per sequence ([B, 1, heads x head dim]) over the cached positions < its valid length."""
        bs = query.shape[0]
        slots = block_tables.reshape(bs, -1, 1) * self.block_size + self.offsets.reshape(1, 1, -1)
        slots = self.slots_of(slots.reshape(bs, -1))                               # [B, T]
        span = slots.shape[1]
        keys = self.gather(self.key_cache, slots.reshape(-1), 0).reshape(bs, span, self.n_kv_heads, self.head_dim)
        values = self.gather(self.value_cache, slots.reshape(-1), 0).reshape(bs, span, self.n_kv_heads,
                                                                              self.head_dim)
        keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)     # [B, kv, T, d]
        q = query.reshape(bs, self.n_kv_heads, self.n_rep, self.head_dim)          # heads grouped by their kv head
        scores = self.bmm_qk(q, keys) * self.scale_value                           # [B, kv, rep, T]
        positions = ops.arange(span, dtype=ms.int32).reshape(1, -1)
        valid = positions < batch_valid_length.reshape(-1, 1)                      # [B, T]
        scores = ops.where(valid.reshape(bs, 1, 1, span), scores, ops.full_like(scores, NEG_INF))
        probs = self.softmax(scores)
        out = self.bmm(probs, values)                                              # [B, kv, rep, d]
        return out.reshape(bs, 1, self.n_heads * self.head_dim)


class CPUInferAttention(nn.Cell):
    """InferAttention's constructor and construct contract (legacy Llama, BSH layout) on CPU kernels."""

    def __init__(self, n_head, head_dim, n_kv_head, pa_n_head_split=None, pa_n_kv_head_split=None,
                 keep_prob=1.0, scale_value=1.0, pre_tokens=2147483647, next_tokens=0, sparse_mode=0,
                 block_size=16, num_blocks=1024, seq_length=-1, is_dynamic=False, use_flash_attention=False,
                 use_alibi_mask=False, use_rope_rotary_emb=True, rotary_cos_format=0, compute_dtype=ms.float32,
                 parallel_decoding=False, chunk_prefill=False):
        super().__init__()
        if use_alibi_mask or not use_rope_rotary_emb:
            raise ValueError("the CPU attention implements rotary embeddings without alibi (Qwen1.5's)")
        self.n_head, self.head_dim, self.n_kv_head = n_head, head_dim, n_kv_head
        self.n_rep = n_head // n_kv_head
        self.scale_value = scale_value
        self.is_first_iteration = True
        self.use_past = True
        self.paged_attention_mgr = CPUPagedAttentionMgr(
            n_head, head_dim, n_kv_head, (num_blocks, block_size, n_kv_head, head_dim), seq_length,
            compute_dtype=compute_dtype, parallel_decoding=parallel_decoding, chunk_prefill=chunk_prefill)
        self.bmm_qk = P.BatchMatMul(transpose_b=True)
        self.bmm = P.BatchMatMul()
        self.softmax = P.Softmax()

    def rotate(self, x, cos, sin, bs, seq, heads):
        """x * cos + rotate_half(x) * sin, for x [B, S, heads x d] and cos/sin [B x S, d]."""
        x = x.reshape(bs * seq, heads, self.head_dim)
        half = self.head_dim // 2
        rotated = ops.concat((-x[:, :, half:], x[:, :, :half]), -1)
        cos, sin = cos.reshape(bs * seq, 1, self.head_dim), sin.reshape(bs * seq, 1, self.head_dim)
        return (x * cos + rotated * sin).reshape(bs, seq, heads * self.head_dim)

    def rotary(self, query, key, freqs_cis, batch_valid_length):
        """Positions 0..S-1 in the prefill, the sequence's last position in a decode step."""
        cos, sin, _ = freqs_cis
        bs, seq = query.shape[0], query.shape[1]
        if self.is_first_iteration:
            cos, sin = cos[:seq], sin[:seq]                           # is_dynamic: the whole table comes in
            cos, sin = ops.tile(cos, (bs, 1)), ops.tile(sin, (bs, 1))
        return (self.rotate(query, cos, sin, bs, seq, self.n_head),
                self.rotate(key, cos, sin, bs, seq, self.n_kv_head))

    def prefill_attention(self, query, key, value):
        """Causal attention of the prompt over itself ([B, S, ...]); right padding is never attended by a valid
        position, and padded positions' outputs are never read. The mask is made here, for S: MindFormers hands
        in none, or (in its predict run mode, which switches to flash attention) the flash kernel's."""
        bs, seq = query.shape[0], query.shape[1]
        positions = ops.arange(seq, dtype=ms.int32)
        future = ops.cast(positions.reshape(1, -1) > positions.reshape(-1, 1), ms.float32)
        q = query.reshape(bs, seq, self.n_kv_head, self.n_rep, self.head_dim).transpose(0, 2, 3, 1, 4)
        q = q.reshape(bs, self.n_kv_head, self.n_rep * seq, self.head_dim)
        k = key.reshape(bs, seq, self.n_kv_head, self.head_dim).transpose(0, 2, 1, 3)
        v = value.reshape(bs, seq, self.n_kv_head, self.head_dim).transpose(0, 2, 1, 3)
        scores = (self.bmm_qk(q, k) * self.scale_value).reshape(bs, self.n_kv_head, self.n_rep, seq, seq)
        probs = self.softmax(scores + (future * NEG_INF).reshape(1, 1, 1, seq, seq))
        out = self.bmm(probs.reshape(bs, self.n_kv_head, self.n_rep * seq, seq), v)      # [B, kv, rep x S, d]
        out = out.reshape(bs, self.n_kv_head, self.n_rep, seq, self.head_dim).transpose(0, 3, 1, 2, 4)
        return out.reshape(bs, seq, self.n_head * self.head_dim)

    def construct(self, query, key, value, batch_valid_length, block_tables, slot_mapping, freqs_cis=None,
                  attn_mask=None, alibi_mask=None, prefix_keys_values=None, q_seq_lens=None):
        query, key = self.rotary(query, key, freqs_cis, batch_valid_length)
        written = self.paged_attention_mgr(key, value, slot_mapping, batch_valid_length)
        query = ops.depend(query, written)
        if self.is_first_iteration:
            return self.prefill_attention(query, key, value)
        return self.paged_attention_mgr.paged_attn(query, batch_valid_length, block_tables)

    def shard(self, parallel_config):
        """No sharding on the CPU."""


class CPUCausalMask(nn.Cell):
    """LowerTriangularMaskWithDynamic's constructor and call, without its seq_length^2 constant (256 MB at the
    0.5B's 8192): CPUInferAttention makes the prefill's causal mask itself, for the prompt's length."""

    def __init__(self, seq_length, *args, **kwargs):
        super().__init__()
        self.seq_length = seq_length
        self.is_first_iteration = True

    def construct(self, tokens=None, masks=None, seq_chunk=None):
        return None

    def prefill(self):
        return None

    def shard(self, parallel_config):
        """No sharding on the CPU."""


@contextlib.contextmanager
def cpu_generation_cells():
    """While a Llama network is built: its attention and causal mask are the CPU cells above. Only the module
    globals the legacy Llama reads them from are swapped, and restored after."""
    import mindformers.models.llama.llama as llama
    import mindformers.models.llama.llama_transformer as llama_transformer
    saved = llama_transformer.InferAttention, llama.LowerTriangularMaskWithDynamic
    llama_transformer.InferAttention, llama.LowerTriangularMaskWithDynamic = CPUInferAttention, CPUCausalMask
    try:
        yield
    finally:
        llama_transformer.InferAttention, llama.LowerTriangularMaskWithDynamic = saved


def trimmed_block_tables(block_tables: np.ndarray, valid_lengths, block_size: int) -> np.ndarray:
    """The columns of the block tables that hold a position of some sequence: a decode step then reads the
    blocks in use, not seq_length's worth of them."""
    used = max(1, -(-int(np.max(valid_lengths)) // block_size))
    return np.ascontiguousarray(block_tables[:, :used])
