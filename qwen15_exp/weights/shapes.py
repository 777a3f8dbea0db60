"""The name and shape of every network weight of a model config (MindFormers' Llama names). Pure arithmetic:
the weights check, the LoRA count and the converter read it."""
from __future__ import annotations


def expected_shapes(model) -> dict[str, tuple]:
    """MindFormers name -> shape of every network weight of `model`."""
    h, f, v = model.hidden_size, model.intermediate_size, model.vocab_size
    kv = (model.n_kv_heads or model.num_heads) * (h // model.num_heads)
    shapes = {"model.tok_embeddings.embedding_weight": (v, h), "model.norm_out.weight": (h,)}
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "attention.wq.weight": (h, h), p + "attention.wk.weight": (kv, h),
                       p + "attention.wv.weight": (kv, h), p + "attention.wo.weight": (h, h),
                       p + "feed_forward.w1.weight": (f, h), p + "feed_forward.w2.weight": (h, f),
                       p + "feed_forward.w3.weight": (f, h), p + "attention_norm.weight": (h,),
                       p + "ffn_norm.weight": (h,)})
        if model.qkv_has_bias:
            shapes.update({p + "attention.wq.bias": (h,), p + "attention.wk.bias": (kv,),
                           p + "attention.wv.bias": (kv,)})
    if not model.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes
