"""Hugging Face Qwen1.5 <-> MindFormers weights, tensor by tensor.

hf2mf reads model.safetensors or a sharded folder (with its index) and writes MindFormers' Llama names as
safetensors (streamed: one tensor in memory at a time) or MindSpore .ckpt (MindSpore's writer needs every
tensor at once). mf2hf reads a MindFormers .safetensors (streamed) or .ckpt (optimizer state dropped) and
writes a loadable Hugging Face folder: model.safetensors (sharded past `shard_gb`) and config.json from the
`model` group. Tied embeddings (0.5B): no lm_head on either side.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.weights.names import HF_TO_MF, MF_TO_HF, rename
from qwen15_exp.weights.tensors import (NAMES, TensorRef, cast, checkpoint_tensors, hf_tensors, load_array, tensor_array,
                                        write_streaming)


@dataclass
class ConvertSummary:
    tensors: int
    bytes_written: int
    largest_tensor_bytes: int
    outputs: list


def target_dtype(src: str, dtype: str) -> str:
    if dtype in ("keep", "", None):
        return src
    if dtype not in NAMES:
        raise UserError(f"dtype={dtype!r}: use bf16, fp16, fp32 or keep")
    return NAMES[dtype]


def _progress(total: int, show: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=" tensors", disable=not show, leave=False)


def hf_to_mf(src: Path, out: Path, dtype: str = "keep", tied: bool | None = None, show_progress: bool = True
             ) -> ConvertSummary:
    from qwen15_exp.weights.check import tensor_shapes
    if src.suffix == ".safetensors":
        tensor_shapes(src)                 # a damaged file: a clear error rather than struct's
    try:
        refs = hf_tensors(src)
    except Exception as e:
        raise UserError(f"{src} cannot be read as Hugging Face weights ({type(e).__name__}: {str(e)[:200]}); it may "
                        "be truncated or incomplete: download or copy it again") from None
    if not refs:
        raise UserError(f"no .safetensors weights found at {src}; give a Hugging Face model folder or file")
    config = (src / "config.json") if src.is_dir() else src.parent / "config.json"
    if tied is None:
        tied = json.loads(config.read_text()).get("tie_word_embeddings", False) if config.is_file() else False
    plan: list[tuple[str, TensorRef]] = []
    unknown = []
    for ref in refs:
        name = rename(ref.name, HF_TO_MF)
        if name is None:
            if not ref.name.endswith("rotary_emb.inv_freq"):
                unknown.append(ref.name)
            continue
        if tied and name == "lm_head.weight":
            continue                       # MindFormers' tied Llama has no lm_head parameter
        plan.append((name, ref))
    if unknown:
        raise UserError(f"{len(unknown)} tensors of {src} are not Qwen2 weights (e.g. {unknown[:3]}); "
                        "is this a Qwen1.5 / Qwen2ForCausalLM checkpoint?")
    by_name = {name: ref for name, ref in plan}
    items = [(name, target_dtype(ref.dtype, dtype), ref.shape) for name, ref in plan]
    largest = max(ref.nbytes for _, ref in plan)
    bar = _progress(len(items), show_progress, "hf -> mindformers")
    if out.suffix == ".ckpt":
        arrays = {}
        for name, dt, _ in items:
            arrays[name] = (cast(load_array(by_name[name]), by_name[name].dtype, dt), dt)
            bar.update(1)
        _save_ckpt(arrays, out)
    else:
        write_streaming(out, items, lambda n: cast(load_array(by_name[n]), by_name[n].dtype,
                                                   target_dtype(by_name[n].dtype, dtype)),
                        metadata={"format": "ms", "source": "qwen15_exp.convert hf2mf"}, progress=bar)
    bar.close()
    return ConvertSummary(len(items), out.stat().st_size, largest, [str(out)])


def _save_ckpt(arrays: dict, out: Path) -> None:
    import mindspore as ms
    from qwen15_exp.atomic import umask, atomic_path
    from qwen15_exp.weights.tensors import bf16_to_f32
    params = []
    for name, (array, dt) in arrays.items():
        if dt == "BF16":
            params.append({"name": name, "data": ms.Tensor(bf16_to_f32(array), ms.float32).astype(ms.bfloat16)})
        else:
            params.append({"name": name, "data": ms.Tensor(array)})
    with atomic_path(out, suffix=".ckpt") as tmp:
        ms.save_checkpoint(params, str(tmp))
        os.chmod(tmp, 0o644 & ~umask())     # MindSpore saves 0400; converted weights are meant to be shared


def hf_config(model, dtype: str, tied: bool) -> dict:
    """config.json of a Qwen2ForCausalLM (the Hugging Face class of every Qwen1.5 size)."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.n_kv_heads or model.num_heads, "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embedding, "rope_theta": model.theta,
        "rms_norm_eps": model.rms_norm_eps, "tie_word_embeddings": tied, "use_sliding_window": False,
        "sliding_window": model.max_position_embedding, "max_window_layers": model.num_layers,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": 151643, "eos_token_id": 151643,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, "bfloat16"),
    }


def write_hf_tokenizer(folder: Path, model, tokenizer_dir: str | None = None) -> None:
    """What transformers, vLLM and lm-eval load beside the weights: the Qwen2 tokenizer (vocab.json, merges.txt,
    tokenizer.json), its tokenizer_config.json with the three Qwen1.5 special tokens and the chat template, and
    Qwen1.5-*-Chat's generation_config.json (the sampling of conf/phase/chat.yaml)."""
    import shutil

    from qwen15_exp.atomic import write_json
    from qwen15_exp.data.chatml import HF_CHAT_TEMPLATE
    from qwen15_exp.data.tokenizer import (ENDOFTEXT, IM_END, IM_END_ID, IM_START, PAD_ID, SPECIAL_TOKENS,
                                           save_tokenizer_json, tokenizer_files)
    for f in tokenizer_files(tokenizer_dir):
        shutil.copyfile(f, folder / f.name)
    save_tokenizer_json(folder / "tokenizer.json", tokenizer_dir)
    special = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1])}
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": special, "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None, "chat_template": HF_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": IM_END, "errors": "replace", "model_max_length": model.max_position_embedding,
        "pad_token": ENDOFTEXT, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None})
    write_json(folder / "generation_config.json", {
        "bos_token_id": PAD_ID, "pad_token_id": PAD_ID, "eos_token_id": [IM_END_ID, PAD_ID], "do_sample": True,
        "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20})


def mf_to_hf(src: Path, out_dir: Path, model, dtype: str = "keep", shard_gb: float = 5.0,
             show_progress: bool = True) -> ConvertSummary:
    from qwen15_exp.atomic import atomic_dir, write_json
    from qwen15_exp.weights.check import check_fits
    check_fits(str(src), model)            # config.json is written from the model: every tensor must agree
    entries = []
    for ref in checkpoint_tensors(src):
        hf = rename(ref.name, MF_TO_HF)
        if hf is not None:                  # adam_m.*, adam_v.*, global_step, ... are not weights
            entries.append((hf, ref))
    if not entries:
        raise UserError(f"{src} holds no MindFormers Llama weights (model.layers.N.attention.wq.weight, ...)")
    tied = not any(hf == "lm_head.weight" for hf, _ in entries)
    layers = 1 + max(int(n.split(".")[2]) for n, _ in entries if n.startswith("model.layers."))
    emb = next(r.shape for n, r in entries if n == "model.embed_tokens.weight")
    if layers != model.num_layers or tuple(emb) != (model.vocab_size, model.hidden_size):
        raise UserError(f"{src} has {layers} layers and embedding {tuple(emb)}, but model={model.name} has "
                        f"{model.num_layers} layers and ({model.vocab_size}, {model.hidden_size}); "
                        "choose the matching model=<size>")
    items = [(hf, target_dtype(r.dtype, dtype), r.shape) for hf, r in entries]
    by_name = dict(entries)
    shards, current, size = [], [], 0
    limit = shard_gb * 1e9
    for item in items:
        nbytes = int(__import__("numpy").prod(item[2])) * {"F32": 4, "F16": 2, "BF16": 2}.get(item[1], 4)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    shards.append(current)
    bar = _progress(len(items), show_progress, "mindformers -> hf")
    largest = max(r.nbytes for _, r in entries)
    with atomic_dir(out_dir) as tmp:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for fname, shard in zip(names, shards):
            write_streaming(tmp / fname, shard, lambda n: cast(tensor_array(by_name[n]), by_name[n].dtype,
                                                               target_dtype(by_name[n].dtype, dtype)),
                            metadata={"format": "pt"}, progress=bar)
        if len(shards) > 1:
            write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": sum((tmp / f).stat().st_size for f in names)},
                "weight_map": {n: f for f, shard in zip(names, shards) for n, _, _ in shard}})
        write_json(tmp / "config.json", hf_config(model, items[0][1], tied))
        write_hf_tokenizer(tmp, model)
        written = sum(p.stat().st_size for p in tmp.iterdir())
    bar.close()
    return ConvertSummary(len(items), written, largest, [str(out_dir / n) for n in names])


def convert(job) -> ConvertSummary:
    from qwen15_exp.compose import absolute_path
    src, out = Path(absolute_path(job.input)), Path(absolute_path(job.output))
    if not src.exists():
        raise UserError(f"input not found: {src}")
    if job.direction == "hf2mf":
        if out.suffix not in (".safetensors", ".ckpt"):
            raise UserError(f"output={out}: end it with .safetensors (streamed) or .ckpt")
        return hf_to_mf(src, out, job.dtype, show_progress=job.progress)
    if job.direction == "lora_merge":           # input: a phase=lora run dir
        from qwen15_exp.weights.lora import merge_run
        written, _ = merge_run(src, out)
        return ConvertSummary(written, out.stat().st_size, 0, [str(out)])
    if job.direction == "lora_peft":            # input: a phase=lora run dir; output: a PEFT folder
        from qwen15_exp.weights.peft import export_run
        files = export_run(src, out, job.base_model)
        from safetensors import safe_open
        with safe_open(str(next(f for f in files if f.suffix == ".safetensors")), "np") as f:
            tensors = len(list(f.keys()))
        return ConvertSummary(tensors, sum(f.stat().st_size for f in files), 0, [str(f) for f in files])
    if job.direction == "mf2hf":
        return mf_to_hf(src, out, job.model, job.dtype, job.shard_gb, show_progress=job.progress)
    raise UserError(f"direction={job.direction!r}: use hf2mf, mf2hf, lora_merge or lora_peft")
