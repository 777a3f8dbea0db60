"""bench/generate: generation on this CPU, ours (MindFormers' generate with qwen15_exp's CPU KV cache) against
transformers' `generate` (its KV cache, fp32), same shape, same threads, same prompt and length.

Each side runs in a fresh process per repetition, alternating; each process builds the model once (random
weights: speed does not depend on them), warms up, then times batch 1 and batch 8: a 32-token prompt and 128
new tokens (eos never ends it early). Figures: time to first token (the prefill) and decode tokens/s (the
128 - 1 later tokens of every sequence over the time after the first), the median of the repetitions.
Also the memory-bandwidth limit of a decode step: the weights' bytes read once per step (fp32) over the
bandwidth this machine's calibration measured (qwen15_exp.estimate.cpu_calibration); decode tokens/s at
batch 1 against it. And our predict estimate at the same batch, against the measurement.

Goals (issue 25): ours >= 1.0x transformers at batch 1 and 8 on both shapes; 0.5B decode >= 0.5x the limit.

Usage: python bench/generate.py [--reps 3] [--shapes tiny,0_5b] [--new 128]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

from job import scratch

SHAPES = {"tiny": ["model=tiny"], "0_5b": ["model=0_5b"]}
PROMPT, BATCHES = 32, (1, 8)

PEER = textwrap.dedent("""
    import json, sys, time
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    m = spec["model"]
    cfg = Qwen2Config(hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                      num_key_value_heads=m["n_kv_heads"] or m["num_heads"], vocab_size=m["vocab_size"],
                      rope_theta=m["theta"], rms_norm_eps=m["rms_norm_eps"], tie_word_embeddings=m["tie_word_embeddings"],
                      max_position_embeddings=m["max_position_embedding"], torch_dtype="float32")
    model = Qwen2ForCausalLM(cfg).eval()
    out = {}
    for batch in [1] + spec["batches"]:
        ids = torch.randint(0, 1000, (batch, spec["prompt"]))
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=spec["new"], min_new_tokens=spec["new"], do_sample=False, pad_token_id=0)
            total = time.perf_counter() - t0
        out[str(batch)] = {"first_token_s": first, "seconds": total,
                           "decode_tokens_per_s": batch * (spec["new"] - 1) / (total - first)}
    print("JSON" + json.dumps(out))
""")

OURS = textwrap.dedent("""
    import json, os, sys, time
    spec = json.loads(sys.argv[1])
    os.environ["LOCAL_DEFAULT_PATH"] = os.environ["LOG_MF_PATH"] = spec["out"]
    from qwen15_exp.launch.start import prepare_process
    prepare_process()
    import numpy as np
    from qwen15_exp.launch.generate import Generator
    gen = Generator(spec["mindformers"], "", quiet=True)
    rng = np.random.default_rng(0)
    out = {}
    for batch in [1] + spec["batches"]:
        prompts = rng.integers(0, 1000, (batch, spec["prompt"])).tolist()
        done = gen.generate_batch(prompts, spec["new"], do_sample=False, eos_token_id=[-1])
        out[str(batch)] = {"first_token_s": done.first_token_s, "seconds": done.seconds,
                           "decode_tokens_per_s": batch * (spec["new"] - 1) / (done.seconds - done.first_token_s)}
    print("JSON" + json.dumps(out))
""")


def plan_of(overrides: list[str], batch: int):
    from hydra import compose, initialize_config_dir

    from qwen15_exp.compose import conf_dir, register, to_experiment
    from qwen15_exp.plan import make_plan
    register()
    args = [*overrides, "hardware=cpu", "phase=predict", f"phase.batch_size={batch}", "data.seq_length=1024"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        exp = to_experiment(compose(config_name="config", overrides=args), overrides=args)
    from pathlib import Path
    return exp, make_plan(exp, Path("."))


def run(script: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.split("JSON", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="tiny,0_5b")
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    from dataclasses import asdict

    from qwen15_exp.estimate.cpu_calibration import load
    from qwen15_exp.estimate.memory import total_params
    from qwen15_exp.estimate.throughput import estimate_predict
    bandwidth = load()["bandwidth_gbs"]
    threads = os.cpu_count() or 1
    with scratch("q15_bench_generate_") as work:
        for shape in args.shapes.split(","):
            exp, plan = plan_of(SHAPES[shape], max(BATCHES))
            spec = {"mindformers": plan.mindformers, "model": asdict(exp.model), "prompt": PROMPT, "new": args.new,
                    "batches": list(BATCHES), "threads": threads, "out": str(work)}
            ours, peer = [], []
            for rep in range(args.reps):
                ours.append(run(OURS, spec))
                peer.append(run(PEER, spec))
            params = total_params(exp.model)
            limit = bandwidth * 1e9 / (4 * params)                 # fp32 weights read once per decode step
            print(f"\n{shape}: {params:,} parameters, prompt {PROMPT}, {args.new} new tokens, {threads} threads, "
                  f"median of {args.reps}")
            for b in BATCHES:
                med = {side: {k: statistics.median(r[str(b)][k] for r in runs) for k in runs[0][str(b)]}
                       for side, runs in (("ours", ours), ("peer", peer))}
                ratio = med["ours"]["decode_tokens_per_s"] / med["peer"]["decode_tokens_per_s"]
                est_exp, _ = plan_of(SHAPES[shape] + [f"phase.batch_size={b}"], b)
                est = estimate_predict(est_exp, prompt_tokens=PROMPT, new_tokens=args.new)
                measured_tps = b * args.new / statistics.median(r[str(b)]["seconds"] for r in ours)
                print(f"  batch {b}: first token {med['ours']['first_token_s']:.3f} s vs "
                      f"{med['peer']['first_token_s']:.3f} s; decode {med['ours']['decode_tokens_per_s']:,.1f} vs "
                      f"{med['peer']['decode_tokens_per_s']:,.1f} tokens/s: {ratio:.2f}x transformers (goal >= 1.0x: "
                      f"{'met' if ratio >= 1.0 else 'NOT met'})")
                print(f"           estimate {est.tokens_per_s:,.1f} tokens/s vs measured {measured_tps:,.1f} "
                      f"({est.tokens_per_s / measured_tps:.2f}x; within 25 %: "
                      f"{'yes' if abs(est.tokens_per_s / measured_tps - 1) <= 0.25 else 'NO'})")
                if b == 1:
                    share = med["ours"]["decode_tokens_per_s"] / limit
                    goal = "goal >= 0.5x: " + ("met" if share >= 0.5 else "NOT met") if shape == "0_5b" else "no goal"
                    print(f"           bandwidth limit {limit:,.1f} tokens/s ({bandwidth:.1f} GB/s / "
                          f"{4 * params / 1e9:.2f} GB of weights): ours at {share:.2f}x of it ({goal})")


if __name__ == "__main__":
    main()
