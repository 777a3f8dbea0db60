"""The files of one run dir, named here and nowhere else (as paths.py names the roots).

    mindformers.yaml      the MindFormers config the run executes (plain: MindFormers alone can train it)
    plan.json             the plan: layout, estimates, adaptations, environment
    result.json           how the run ended, what it measured (written while running too: `running`)
    summary.txt           the one-screen summary the terminal showed
    steps_rank<r>.jsonl   each training step of rank r as it happens
    eval_rank<r>.jsonl    each evaluation of rank r (mindformers_ext.TokenPerplexity)
    rank_<r>.json         what rank r of an msrun job reports when it ends (losses, generated texts, ...)
    output/               MindFormers' own output folder (LOCAL_DEFAULT_PATH): checkpoints, strategy, logs
    output/log/console.log  what MindFormers printed while it ran here
"""
from __future__ import annotations

import json
from pathlib import Path

MINDFORMERS_YAML = "mindformers.yaml"
PLAN = "plan.json"
RESULT = "result.json"
SUMMARY = "summary.txt"
WORKER = "worker.py"
PREDICT_DATA = "predict_data.json"
TOKENIZER = "tokenizer.json"
BENCHMARK_SPEC = "benchmark.json"          # eval.tasks: the harness's settings (qwen15_exp/benchmark.py)
STEPS_GLOB = "steps_rank*.jsonl"
RANK_RECORD_GLOB = "rank_*.json"


def steps_log(run_dir, rank: int = 0) -> Path:
    return Path(run_dir) / f"steps_rank{int(rank)}.jsonl"


def eval_log_path(run_dir, rank: int = 0) -> Path:
    return Path(run_dir) / f"eval_rank{int(rank)}.jsonl"


def rank_record(run_dir, rank: int) -> Path:
    return Path(run_dir) / f"rank_{int(rank)}.json"


def rank_records(run_dir) -> list[dict]:
    """Every rank's end-of-run record, in rank order."""
    paths = sorted(Path(run_dir).glob(RANK_RECORD_GLOB), key=lambda p: int(p.stem.split("_")[1]))
    return [json.loads(p.read_text()) for p in paths]


def lm_eval_dir(run_dir) -> Path:
    """lm-evaluation-harness's own output (results_<date>.json, samples_<task>_<date>.jsonl)."""
    return Path(run_dir) / "lm_eval"


def output_dir(run_dir) -> Path:
    return Path(run_dir) / "output"


def console_log(run_dir) -> Path:
    return output_dir(run_dir) / "log" / "console.log"


def mindformers_env(run_dir) -> dict:
    """MindFormers picks its output and log folders from these when it is first imported."""
    out = output_dir(run_dir)
    return {"LOCAL_DEFAULT_PATH": str(out), "LOG_MF_PATH": str(out / "log")}
