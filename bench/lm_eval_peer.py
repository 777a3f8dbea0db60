"""bench/lm_eval_peer: benchmark requests per second, ours (`phase=eval eval.tasks=[...]`, the qwen15_exp model
for lm-evaluation-harness) against lm-eval's own `hf` model (transformers, PyTorch, fp32) on the same weights,
the same tasks, the same batch size and this CPU.

The weights are random (speed does not depend on them): a Qwen2 of the shape is saved as a Hugging Face folder
and converted for us (`qwen15_exp.convert direction=hf2mf`). The tasks are written here over local JSON:
multiple choice in MMLU's template (four one-token answers after a ~200-token question: lm-eval's
loglikelihood requests as MMLU and C-Eval make them) and rolling loglikelihood over ~300-token documents
(as wikitext). Both sides run lm-eval's simple_evaluate in a fresh process; the clock runs from the call to its
end, without loading the model (the `hf` model is built before; our networks' build time is taken out).

Goal (issue 28): ours >= 1.0x the `hf` model's requests/s.

Usage: python bench/lm_eval_peer.py [--shapes tiny,0_5b] [--docs 64] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

from job import scratch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lm_eval_tasks import task_yaml  # noqa: E402  (the task formats the tests write: MMLU's, rolling)

SHAPES = {"tiny": "tiny", "0_5b": "0_5b"}
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue").split()

HF_SIDE = textwrap.dedent("""
    import json, sys, time
    spec = json.loads(sys.argv[1])
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    # the same rolling windows as ours: <|endoftext|> before each document (a chat export's eos is <|im_end|>)
    lm = HFLM(pretrained=spec["hf"], dtype="float32", batch_size=spec["batch"], device="cpu",
              max_length=spec["max_length"], prefix_token_id=151643)
    tm = TaskManager(include_path=spec["tasks_dir"])
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=spec["tasks"], task_manager=tm, batch_size=spec["batch"],
                          log_samples=False)
    seconds = time.perf_counter() - t0
    print("JSON" + json.dumps({"seconds": seconds, "metrics": res["results"]}, default=str))
""")

MAKE_HF = textwrap.dedent("""
    import json, sys, torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    spec = json.loads(sys.argv[1]); m = spec["model"]
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                      num_key_value_heads=m["n_kv_heads"] or m["num_heads"], vocab_size=m["vocab_size"],
                      rope_theta=m["theta"], rms_norm_eps=m["rms_norm_eps"], tie_word_embeddings=m["tie_word_embeddings"],
                      max_position_embeddings=m["max_position_embedding"], torch_dtype="float32")
    Qwen2ForCausalLM(cfg).eval().save_pretrained(spec["out"], safe_serialization=True)
""")


def write_tasks(folder: Path, docs: int) -> Path:
    rng = random.Random(0)
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    mc = [{"question": " ".join(rng.choice(WORDS) for _ in range(150)) + "?",
           "choices": [rng.choice(WORDS) for _ in range(4)], "answer": rng.randrange(4)} for _ in range(docs)]
    text = [{"text": " ".join(rng.choice(WORDS) for _ in range(250)) + "."} for _ in range(max(4, docs // 8))]
    for name, rows, kind in (("bench_mc", mc, "local_mmlu"), ("bench_rolling", text, "local_rolling")):
        (tasks / f"{name}.json").write_text(json.dumps(rows))
        (tasks / f"{name}.yaml").write_text(task_yaml(kind, name, tasks / f"{name}.json"))
    return tasks


def model_of(shape: str) -> dict:
    from dataclasses import asdict

    from qwen15_exp.compose import compose_overrides, register, to_experiment
    register()
    overrides = [f"model={shape}"]
    return asdict(to_experiment(compose_overrides(overrides), overrides=overrides).model)


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def bench_shape(work: Path, shape: str, tasks: Path, batch: int, max_length: int) -> dict:
    from qwen15_exp.weights.hf_conversion import write_hf_tokenizer
    model = model_of(shape)
    hf, ckpt = work / f"hf_{shape}", work / f"{shape}.safetensors"
    run([sys.executable, "-c", MAKE_HF, json.dumps({"model": model, "out": str(hf)})], work)
    from types import SimpleNamespace
    write_hf_tokenizer(hf, SimpleNamespace(**model))
    run([sys.executable, "-m", "qwen15_exp.convert", "direction=hf2mf", f"input={hf}", f"output={ckpt}",
         f"model={shape}", "progress=false"], work)
    names = ["bench_mc", "bench_rolling"]
    env = {"QWEN15_EXP_OUTPUTS": str(work / "outputs"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run([sys.executable, "-m", "qwen15_exp", f"model={shape}", "hardware=cpu", "phase=eval",
         f"phase.load_checkpoint={ckpt}", f"eval.tasks=[{','.join(names)}]", f"eval.include_path=[{tasks}]",
         f"eval.batch_size={batch}", f"eval.max_length={max_length}", f"hydra.run.dir={work / f'ours_{shape}'}"],
        work, env)
    ours = json.loads((work / f"ours_{shape}" / "result.json").read_text())["benchmark"]
    out = run([sys.executable, "-c", HF_SIDE, json.dumps({"hf": str(hf), "batch": batch, "tasks": names,
                                                           "tasks_dir": str(tasks), "max_length": max_length})],
              work, env)
    theirs = json.loads(out.split("JSON", 1)[1])
    requests = ours["requests"]
    their_rate = requests / theirs["seconds"]
    return {"shape": shape, "requests": requests, "ours_s": ours["seconds"] - ours["build_s"],
            "ours_rps": ours["requests_per_s"], "hf_s": theirs["seconds"], "hf_rps": their_rate,
            "ratio": ours["requests_per_s"] / their_rate,
            "ppl": (ours["metrics"]["bench_rolling/word_perplexity"]["value"],
                    theirs["metrics"]["bench_rolling"]["word_perplexity,none"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,0_5b")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=512)
    args = ap.parse_args()
    with scratch("qwen15_bench_lm_eval_") as work:
        tasks = write_tasks(work, args.docs)
        rows = [bench_shape(work, s, tasks, args.batch, args.max_length) for s in args.shapes.split(",")]
    print(f"lm-eval requests/s on this CPU ({args.docs} MMLU-format questions x 4 answers + "
          f"{max(4, args.docs // 8)} rolling documents, batch {args.batch}):")
    print(f"{'shape':<6} {'requests':>8} {'ours s':>8} {'ours req/s':>10} {'hf s':>8} {'hf req/s':>9} "
          f"{'ratio':>6}  goal   word ppl ours / hf")
    for r in rows:
        print(f"{r['shape']:<6} {r['requests']:>8} {r['ours_s']:>8.1f} {r['ours_rps']:>10.1f} {r['hf_s']:>8.1f} "
              f"{r['hf_rps']:>9.1f} {r['ratio']:>5.2f}x  >=1.0x  {r['ppl'][0]:.6g} / {r['ppl'][1]:.6g}")


if __name__ == "__main__":
    main()
