"""bench/peer: our CPU training against the PyTorch run a user would otherwise write.

The same Qwen1.5-shaped model (the tiny default, and one of about 50 M parameters) trained by
`python -m qwen15_exp` (MindSpore + MindFormers) and by PyTorch + transformers (`Qwen2ForCausalLM`, AdamW,
fp32, gradients clipped at 1.0 as the recipe's are), with the same batch, sequence length and thread count,
alternating, each in a fresh process. Steady
tokens/s = tokens per step / median step time over steps 2..N (the first step compiles or warms up).
Goal: ours >= 1.0x the peer.

Usage: python bench/peer.py [--steps 30] [--reps 2] [--models tiny,50m]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from job import run_job, scratch

# name -> (our overrides, the model's shape for transformers)
MODELS = {
    "tiny": ([], dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176)),
    "50m": (["model=mini", "model.hidden_size=320", "model.num_heads=5", "model.intermediate_size=880"],
            dict(hidden_size=320, num_hidden_layers=4, num_attention_heads=5, intermediate_size=880)),
}
VOCAB, SEQ, BATCH = 151936, 128, 1

PEER = textwrap.dedent("""
    import json, statistics, sys, time
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    shape, steps, threads, seq, batch, vocab = json.loads(sys.argv[1])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, num_key_value_heads=shape["num_attention_heads"], rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=seq,
                      torch_dtype="float32", **shape)          # transformers' default attention (sdpa)
    model = Qwen2ForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ids = torch.randint(0, vocab, (batch, seq + 1))
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)     # as the recipe's use_clip_grad does
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(out.loss.item())
    print(json.dumps({"step_s": statistics.median(times[1:]), "params": sum(p.numel() for p in model.parameters()),
                      "first_loss": losses[0], "last_loss": losses[-1]}))
""")


def ours(work: Path, name: str, overrides: list[str], steps: int, env: dict) -> dict:
    result = run_job(work, name, env, steps, overrides)
    times = result["measured"]["step_times_s"]
    return {"step_s": statistics.median(times[1:]), "params": result["plan"]["params_total"]}


def peer(shape: dict, steps: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", PEER, json.dumps([shape, steps, threads, SEQ, BATCH, VOCAB])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the PyTorch peer failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--models", default="tiny,50m")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with scratch("q15_peer_") as work:
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
        rows = []
        for model in args.models.split(","):
            overrides, shape = MODELS[model]
            ours(work, f"{model}_warmup", overrides, 3, env)         # data, calibration and compile cache, once
            mine, theirs = [], []
            for i in range(args.reps):
                mine.append(ours(work, f"{model}_{i}", overrides, args.steps, env))
                theirs.append(peer(shape, args.steps, args.threads))
                print(f"{model} rep {i}: qwen15_exp {SEQ * BATCH / mine[-1]['step_s']:.0f} tokens/s, "
                      f"PyTorch {SEQ * BATCH / theirs[-1]['step_s']:.0f} tokens/s", flush=True)
            ours_tps = SEQ * BATCH / statistics.median(r["step_s"] for r in mine)
            peer_tps = SEQ * BATCH / statistics.median(r["step_s"] for r in theirs)
            rows.append((model, mine[0]["params"], theirs[0]["params"], ours_tps, peer_tps))

        print(f"\nbench/peer: batch {BATCH} x seq {SEQ}, fp32, {args.threads} threads, {args.steps} steps, "
              f"median of {args.reps} runs each")
        print(f"{'model':<6}{'params (ours/peer)':>22}{'qwen15_exp tok/s':>18}{'PyTorch tok/s':>15}{'ratio':>8}")
        for model, p_ours, p_peer, a, b in rows:
            print(f"{model:<6}{f'{p_ours / 1e6:.1f}M / {p_peer / 1e6:.1f}M':>22}{a:>18.0f}{b:>15.0f}{a / b:>8.2f}")
        worst = min(a / b for *_, a, b in rows)
        print(f"goal: ours >= 1.0x the peer -> {'met' if worst >= 1.0 else 'NOT met'} (worst {worst:.2f}x)")


if __name__ == "__main__":
    main()
