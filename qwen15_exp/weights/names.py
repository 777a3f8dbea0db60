"""The Hugging Face Qwen2 <-> MindFormers Llama weight names: one table, read in both directions."""
from __future__ import annotations

import re

# One row per weight: the Hugging Face Qwen2 name and the MindFormers Llama name. {i} is the layer index,
# {wb} weight or bias. Tensors are copied as they are: no transpose, no RoPE permutation, no QKV fusion.
NAME_PAIRS = [
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    ("model.layers.{i}.self_attn.q_proj.{wb}", "model.layers.{i}.attention.wq.{wb}"),
    ("model.layers.{i}.self_attn.k_proj.{wb}", "model.layers.{i}.attention.wk.{wb}"),
    ("model.layers.{i}.self_attn.v_proj.{wb}", "model.layers.{i}.attention.wv.{wb}"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _rule(src: str, dst: str) -> tuple[str, str]:
    pattern = "^" + re.escape(src).replace(r"\{i\}", r"(\d+)").replace(r"\{wb\}", "(weight|bias)") + "$"
    groups = iter([r"\1", r"\2"])
    replacement = re.sub(r"\{i\}|\{wb\}", lambda _: next(groups), dst)
    return pattern, replacement


HF_TO_MF = [_rule(hf, mf) for hf, mf in NAME_PAIRS]
MF_TO_HF = [_rule(mf, hf) for hf, mf in NAME_PAIRS]


def rename(name: str, table) -> str | None:
    for pattern, repl in table:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None                           # not a network weight (optimizer state, step counters, rotary cache)
