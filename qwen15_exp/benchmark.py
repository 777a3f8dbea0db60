"""Benchmarks through lm-evaluation-harness (`phase=eval eval.tasks=[...]`): lm-eval's task registry and the
user's task YAMLs (eval.include_path), its few-shot sampling, metrics, stderr and output files; the model that
answers its requests is qwen15_exp.lm_eval_model's.

Offline, as clusters are: datasets come from the Hugging Face datasets cache or local files. HF_DATASETS_OFFLINE
and HF_HUB_OFFLINE are set to 1 unless the user set them (HF_DATASETS_OFFLINE=0 lets a machine with internet
fetch). The tasks are loaded before any model is built, and a task whose data is not here is a UserError that
names the task, its dataset and what to download where.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
from pathlib import Path

from qwen15_exp.errors import UserError

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def runs_benchmark(exp) -> bool:
    return exp.phase.run_mode == "eval" and bool(exp.eval.tasks)


def spec_of(exp) -> dict:
    """What the harness needs of the experiment, as plain data (written into plans)."""
    e = exp.eval
    return {"tasks": list(e.tasks), "num_fewshot": e.num_fewshot,
            "limit": (int(e.limit) if e.limit is not None and e.limit >= 1 else e.limit),
            "batch_size": int(e.batch_size), "apply_chat_template": bool(e.apply_chat_template),
            "fewshot_as_multiturn": bool(e.fewshot_as_multiturn), "system_instruction": e.system_instruction,
            "include_path": list(e.include_path), "seed": int(e.seed),
            "max_length": int(e.max_length or exp.data.seq_length), "max_gen_toks": int(e.max_gen_toks),
            "gen_kwargs": dict(e.gen_kwargs), "model_name": f"qwen15_exp-{exp.model.name}",
            "log_samples": bool(e.log_samples), "tokenizer_dir": exp.data.tokenizer_dir or "",
            # task YAMLs name their data files relative to where the command was typed, as lm-eval reads them
            "cwd": os.getcwd()}


def go_offline() -> None:
    """Nothing fetched at run time, unless the user said otherwise (the libraries read these at import)."""
    for key in OFFLINE_VARIABLES:
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")    # lm-eval imports it; it has no PyTorch here
    if os.environ["HF_DATASETS_OFFLINE"] not in ("0", "false", "False"):
        import datasets.config
        import huggingface_hub.constants
        datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def in_dir(path: str):
    here = os.getcwd()
    os.chdir(path if path and Path(path).is_dir() else here)
    try:
        yield
    finally:
        os.chdir(here)


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple):
    """lm-eval's index of its ~15,000 task YAMLs and the user's (10 s to build: once per process)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=list(include_path) or None)


def leaf_tasks(tm, name: str) -> list[str]:
    """The tasks a group or tag stands for (a task: itself)."""
    from lm_eval.tasks._index import Kind
    entry = tm.task_index.get(name)
    if entry is None or entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [name]
    if entry.kind == Kind.TAG:
        subs = [n for n, e in tm.task_index.items() if name in e.tags]
    else:
        subs = [t["task"] if isinstance(t, dict) else t for t in (entry.cfg or {}).get("task", [])]
    return [leaf for sub in subs if isinstance(sub, str) for leaf in leaf_tasks(tm, sub)]


def task_config(tm, task: str) -> dict:
    entry = tm.task_index.get(task)
    return (entry.cfg if entry else None) or {}


def dataset_of(cfg: dict) -> str:
    path, name = cfg.get("dataset_path", "?"), cfg.get("dataset_name")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files:
        return f"{path} files {files}"
    return f"{path}" + (f" (config {name!r})" if name else "")


def missing_data(tm, requested: str, error: Exception) -> str:
    """Which task's data is missing, and what to download where."""
    for leaf in leaf_tasks(tm, requested):
        try:
            tm.load([leaf])
        except Exception as e:          # noqa: BLE001 - the datasets library raises many kinds; said in full below
            cfg = task_config(tm, leaf)
            head = f"eval.tasks: task {leaf!r}" + (f" (of {requested!r})" if leaf != requested else "")
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if (cfg.get("dataset_kwargs") or {}).get("data_files") or cfg.get("dataset_path") in ("json", "csv",
                                                                                                  "parquet", "text"):
                return f"{head} reads {dataset_of(cfg)}, which cannot be read here ({reason}); fix the task YAML's data_files"
            path, name = cfg.get("dataset_path", "?"), cfg.get("dataset_name")
            args = repr(path) + (f", {name!r}" if name else "")
            cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
                os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "datasets")
            return (f"{head} needs dataset {dataset_of(cfg)}, which is not in this machine's Hugging Face "
                    f"cache ({cache}) and nothing is fetched at run time ({reason}). On a machine with internet run "
                    f"`python -c \"import datasets; datasets.load_dataset({args})\"` and copy its "
                    "~/.cache/huggingface (hub and datasets) here, or set HF_HOME / HF_DATASETS_CACHE to where the "
                    "copy is (HF_DATASETS_OFFLINE=0 lets this machine download it)")
    return f"eval.tasks: {requested!r} could not be loaded: {str(error).strip().splitlines()[0]}"


def load_tasks(spec: dict) -> None:
    """Every task known and its data here, before any model is built; else a UserError saying what to do."""
    go_offline()
    tm = task_manager(tuple(spec["include_path"]))
    unknown = [t for t in spec["tasks"] if t not in tm.task_index and not Path(t).is_file()]
    if unknown:
        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
        said = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
        raise UserError(f"eval.tasks: no task, group or tag {said} in lm-eval's registry"
                        + (f" or eval.include_path={spec['include_path']}" if spec["include_path"] else "")
                        + "; `lm_eval ls tasks` lists them, and your own task YAMLs go in eval.include_path")
    import logging
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)           # its notes on task YAMLs come again in <run dir>/lm_eval/lm_eval.log
    with in_dir(spec["cwd"]), contextlib.ExitStack() as restore:
        restore.callback(log.setLevel, level)
        for name in spec["tasks"]:
            try:
                tm.load([name])
            except Exception as e:      # noqa: BLE001 - narrowed to the task and dataset in the message
                raise UserError(missing_data(tm, name, e)) from None


@contextlib.contextmanager
def harness_output(output_dir: Path, verbose: bool = False):
    """lm-eval's log lines and its task-building bars into <output_dir>/lm_eval.log; the model's own request
    bars stay on the terminal (they write to the stream they were given); verbose=true leaves it all there."""
    import logging
    import sys

    import lm_eval.evaluator
    if verbose:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "lm_eval.log", "a", encoding="utf-8") as sink:
        log, handler = logging.getLogger("lm_eval"), logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        saved = (log.handlers[:], log.propagate, lm_eval.evaluator.get_git_commit_hash)
        log.handlers, log.propagate = [handler], False
        # it runs `git describe` where the command was typed ("fatal: not a git repository" on the terminal);
        # the run's versions are in result.json
        lm_eval.evaluator.get_git_commit_hash = lambda: None
        try:
            with contextlib.redirect_stderr(sink):
                yield
        finally:
            log.handlers, log.propagate = saved[0], saved[1]
            lm_eval.evaluator.get_git_commit_hash = saved[2]
            sys.stderr.flush()


def evaluate(lm, spec: dict, output_dir: Path, verbose: bool = False) -> dict:
    """lm-eval's simple_evaluate with the spec's settings; its results and samples files under output_dir."""
    go_offline()
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    tracker = EvaluationTracker(output_path=str(output_dir))
    seed = spec["seed"]
    with in_dir(spec["cwd"]), harness_output(Path(output_dir), verbose):
        results = simple_evaluate(
            model=lm, tasks=list(spec["tasks"]), num_fewshot=spec["num_fewshot"], limit=spec["limit"],
            batch_size=spec["batch_size"], task_manager=task_manager(tuple(spec["include_path"])),
            gen_kwargs=spec.get("gen_kwargs") or None,
            # only names the output folder (lm_eval/<name>/results_<time>.json): the model is built already
            model_args={"pretrained": spec.get("model_name", "qwen15_exp")},
            apply_chat_template=spec["apply_chat_template"], fewshot_as_multiturn=spec["fewshot_as_multiturn"],
            system_instruction=spec["system_instruction"] or None, log_samples=spec["log_samples"],
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            evaluation_tracker=tracker)
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in (results.get("configs") or {}) if samples else ():
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


def metric_name(task: str, key: str) -> str:
    """"acc,none" of task t -> "t/acc"; another filter stays: "gsm8k/exact_match,strict-match"."""
    metric, _, filt = key.partition(",")
    return f"{task}/{metric}" + (f",{filt}" if filt and filt != "none" else "")


def task_metrics(results: dict) -> dict:
    """{"<task>/<metric>": {"value", "stderr", "higher_is_better"}} for every task and group lm-eval scored."""
    out = {}
    better = results.get("higher_is_better") or {}
    for task, figures in (results.get("results") or {}).items():
        for key, value in figures.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",", 1)[0]
            stderr = figures.get(key.replace(",", "_stderr,", 1))
            out[metric_name(task, key)] = {
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": (better.get(task) or {}).get(metric)}
    return out


def summary_of(results: dict, lm, seconds: float, output_dir: Path) -> dict:
    """result.json's "benchmark": the metrics, what was asked, how many requests and how fast."""
    from qwen15_exp.lm_eval_model import requests_per_second
    n_samples = results.get("n-samples") or {}
    return {"metrics": task_metrics(results),
            "samples": {t: v.get("effective") for t, v in n_samples.items() if isinstance(v, dict)},
            "num_fewshot": results.get("n-shot") or {},
            "requests": lm.stats["requests"],
            "forward_passes": lm.stats["forward_passes"], "seconds": round(seconds, 3),
            "build_s": round(lm.stats["build_s"], 3),
            "requests_per_s": requests_per_second(lm.stats, seconds), "output_dir": str(output_dir)}


def run_harness(mf_config: dict, checkpoint: str, spec: dict, run_dir: Path, verbose: bool = False,
                check_tasks: bool = True) -> dict:
    """(Check the tasks,) build our model on the run's network and weights, let lm-eval evaluate: the summary
    (summary_of). The in-process launcher (whose run checked the tasks already) and a plan's worker (whose
    data is checked where it runs) both call this."""
    import time

    from qwen15_exp import run_files
    from qwen15_exp.lm_eval_model import MindFormersLM
    t0 = time.perf_counter()
    if check_tasks:
        load_tasks(spec)
    lm = MindFormersLM(mf_config, checkpoint, batch_size=spec["batch_size"], max_length=spec["max_length"],
                       max_gen_toks=spec["max_gen_toks"], tokenizer_dir=spec["tokenizer_dir"] or None)
    out = run_files.lm_eval_dir(run_dir)
    results = evaluate(lm, spec, out, verbose)
    return summary_of(results, lm, time.perf_counter() - t0, out)


def spec_file(run_dir: Path) -> Path:
    from qwen15_exp import run_files
    return Path(run_dir) / run_files.BENCHMARK_SPEC


def read_spec(run_dir: Path) -> dict | None:
    p = spec_file(run_dir)
    return json.loads(p.read_text()) if p.is_file() else None
