"""bench/convert: HF -> MindFormers conversion speed and peak memory.

1. A synthetic Hugging Face checkpoint in Qwen1.5 layout, bf16, sharded in two files with its index
   (hidden 2048, 32 layers, ffn 5504, vocab 151936: 2.24 B parameters, ~4.5 GB). Converted with
   `python -m qwen15_exp.convert` (streamed safetensors out); compared with a plain copy of the same bytes
   (the limit) and its peak memory with the largest tensor. Goals: >= 0.5x copy speed; peak < 2x largest
   tensor + 600 MB.
2. A 0.5B-shaped checkpoint: our converter's peak memory against the seed's approach (transformers
   `Qwen2ForCausalLM.from_pretrained` in fp32, then each tensor cast: the whole model in memory).

Usage: python bench/convert.py [--layers 32]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from qwen15_exp.weights.tensors import write_streaming


def hf_names(hidden, layers, ffn, vocab, tied):
    kv = hidden
    items = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        items += [(f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.q_proj.bias", (hidden,)),
                  (f"{p}.self_attn.k_proj.weight", (kv, hidden)), (f"{p}.self_attn.k_proj.bias", (kv,)),
                  (f"{p}.self_attn.v_proj.weight", (kv, hidden)), (f"{p}.self_attn.v_proj.bias", (kv,)),
                  (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
                  (f"{p}.mlp.gate_proj.weight", (ffn, hidden)), (f"{p}.mlp.up_proj.weight", (ffn, hidden)),
                  (f"{p}.mlp.down_proj.weight", (hidden, ffn)),
                  (f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,))]
    items.append(("model.norm.weight", (hidden,)))
    if not tied:
        items.append(("lm_head.weight", (vocab, hidden)))
    return items


def make_checkpoint(folder: Path, hidden, layers, ffn, vocab, heads, tied, dtype="BF16", shards=2) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    items = [(n, dtype, s) for n, s in hf_names(hidden, layers, ffn, vocab, tied)]
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**16, size=8 * 2**20, dtype=np.uint16 if dtype == "BF16" else np.uint32)

    def produce(name):
        shape = next(s for n, _, s in items if n == name)
        n = int(np.prod(shape))
        reps = -(-n // pool.size)
        return np.tile(pool, reps)[:n].reshape(shape) if reps > 1 else pool[:n].reshape(shape)

    per = -(-len(items) // shards)
    files, weight_map = [], {}
    for k in range(shards):
        part = items[k * per:(k + 1) * per]
        fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_streaming(folder / fname, part, produce, metadata={"format": "pt"})
        files.append(folder / fname)
        weight_map.update({n: fname for n, _, _ in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({
            "metadata": {"total_size": sum(f.stat().st_size for f in files)}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "num_hidden_layers": layers, "intermediate_size": ffn, "vocab_size": vocab, "num_attention_heads": heads,
        "num_key_value_heads": heads, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768}))
    return sum(f.stat().st_size for f in files)


def child_peak(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of a child process, measured with wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def convert_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qwen15_exp.convert", "direction=hf2mf", f"input={src}", f"output={out}",
            "progress=false", f"hydra.run.dir={out.parent / 'hydra'}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="q15_convert_"))
    try:
        src = work / "hf_big"
        size = make_checkpoint(src, 2048, args.layers, 5504, 151936, 16, tied=False)
        largest = 151936 * 2048 * 2
        print(f"synthetic HF checkpoint: {size / 1e9:.2f} GB in 2 shards, largest tensor {largest / 1e6:.0f} MB",
              flush=True)
        t0 = time.perf_counter()
        for f in src.glob("*.safetensors"):
            shutil.copyfile(f, work / f"copy_{f.name}")
        copy_s = time.perf_counter() - t0
        for f in work.glob("copy_*"):
            f.unlink()
        conv_s, conv_peak = child_peak(convert_cmd(src, work / "mf_big.safetensors"))
        (work / "mf_big.safetensors").unlink()
        print(f"\nbench/convert: {size / 1e9:.2f} GB bf16, hf2mf, streamed safetensors out")
        print(f"  plain copy of the same bytes   {size / 1e6 / copy_s:8.0f} MB/s  (limit)")
        print(f"  qwen15_exp.convert (command)   {size / 1e6 / conv_s:8.0f} MB/s  ratio {copy_s / conv_s:.2f} "
              f"(goal >= 0.5: {'met' if copy_s / conv_s >= 0.5 else 'NOT met'})")
        limit_mb = 2 * largest / 2**20 + 600
        print(f"  peak memory {conv_peak:.0f} MB vs largest tensor {largest / 2**20:.0f} MB: "
              f"{conv_peak / (largest / 2**20):.2f}x (goal < 2x + 600 MB = {limit_mb:.0f} MB: "
              f"{'met' if conv_peak < limit_mb else 'NOT met'})")
        shutil.rmtree(src)

        small = work / "hf_05b"
        make_checkpoint(small, 1024, 24, 2816, 151936, 16, tied=True, shards=1)
        _, ours = child_peak(convert_cmd(small, work / "mf_05b.safetensors"))
        seed = textwrap.dedent(f"""
            import torch
            from transformers import Qwen2ForCausalLM
            model = Qwen2ForCausalLM.from_pretrained({str(small)!r}, torch_dtype=torch.float32)
            out = {{name: p.detach().to(torch.float16).numpy() for name, p in model.named_parameters()}}
        """)
        _, seed_peak = child_peak([sys.executable, "-c", seed])
        print(f"\n0.5B-shaped checkpoint: peak memory qwen15_exp.convert {ours:.0f} MB, seed's approach "
              f"(transformers load in fp32, then cast) {seed_peak:.0f} MB: {seed_peak / ours:.1f}x less")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
