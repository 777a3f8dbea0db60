"""One run, straight through: compose -> layout -> validate -> data -> weights -> plan -> launch -> result.

The layout, the hardware adaptations, the launcher decision and the memory estimate are computed once here
and handed on.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from qwen15_exp import compose, run_files
from qwen15_exp.adapt import adapt
from qwen15_exp.atomic import write_json, write_text
from qwen15_exp.errors import UserError
from qwen15_exp.estimate.memory import estimate_memory
from qwen15_exp.launch import launch
from qwen15_exp.launch.choose import choose_launcher
from qwen15_exp.layout import layout_of
from qwen15_exp.lifecycle import RunInterrupted, StopRequest, classify_failure, first_line, stop_on_signals
from qwen15_exp.plan import Dataset, make_plan
from qwen15_exp.result import job_line, summary_text, versions
from qwen15_exp.sweep import config_sha
from qwen15_exp.validate import InvalidExperiment, validate
from qwen15_exp.weights.checkpoint import checkpoint_of_run_dir, is_run_dir, resolve_checkpoint
from qwen15_exp.benchmark import load_tasks, runs_benchmark, spec_file, spec_of


def prepare_dataset(exp, show_progress: bool = True) -> Dataset | None:
    """The MindRecord the run trains on (or phase=eval scores): a raw file prepared (and cached), or a given
    MindRecord; rows of seq_length+1 tokens."""
    if exp.phase.run_mode == "predict" or exp.data.format == "none" or runs_benchmark(exp):
        return None
    return dataset_of(exp.data, exp.data.seq_length + 1, "data", show_progress)


def prepare_eval_dataset(exp, show_progress: bool = True) -> Dataset | None:
    """The dataset evaluated during training: phase.eval.input prepared like the training data, in rows of
    seq_length tokens (the width the training network takes in eval mode)."""
    if not (exp.phase.trains and exp.phase.eval.every_steps):
        return None
    from dataclasses import replace
    src = exp.phase.eval.input
    fmt = "mindrecord" if (Path(src).is_dir() or ".mindrecord" in Path(src).name) else exp.data.format
    return dataset_of(replace(exp.data, input=src, format=fmt), exp.data.seq_length, "phase.eval", show_progress)


def dataset_of(data, width: int, what: str, show_progress: bool) -> Dataset:
    if data.format == "mindrecord":
        from qwen15_exp.data.mindrecord import inspect_mindrecord
        folder, columns, rows, got = inspect_mindrecord(Path(data.input))
        if got != width:
            raise UserError(f"{data.input} holds rows of {got} tokens, but {what} needs rows of {width} "
                            f"(data.seq_length={data.seq_length}); prepare it again with that width")
        return Dataset(str(folder), tuple(columns), rows)
    from qwen15_exp.data.cache import prepare, summary_lines
    prepared = prepare(data, width - 1, show_progress=show_progress)
    if show_progress or not prepared.reused:
        print(f"{what}: {'reused the cached' if prepared.reused else 'prepared'} MindRecord {prepared.folder}")
        for line in summary_lines(prepared.summary):
            print(f"  {line}")
    return Dataset(str(prepared.folder), tuple(prepared.summary["columns"]), prepared.rows)


def write_predict_files(plan, exp) -> None:
    """tokenizer.json and the prompts (ChatML-wrapped for chat) a predict plan's workers read."""
    from qwen15_exp.data.chatml import chat_prompt, eos_token
    from qwen15_exp.data.tokenizer import save_tokenizer_json
    run_dir = Path(plan.run_dir)
    save_tokenizer_json(run_dir / run_files.TOKENIZER, exp.data.tokenizer_dir or None)
    prompts = list(exp.phase.predict_data)
    if exp.phase.chat:
        prompts = [chat_prompt(exp.phase.system_prompt, p) for p in prompts]
    g = exp.phase.generation
    write_json(run_dir / run_files.PREDICT_DATA, {
        "inputs": prompts, "eos_token": eos_token(exp.phase.chat), "batch_size": exp.phase.batch_size,
        "max_new_tokens": g.max_new_tokens, "max_length": g.max_decode_length})


def dump_yaml(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110)


def training_figures(plan, launched, process_start: float) -> dict:
    """The loss curve and step times from the ranks' step logs, with what only the launcher knew."""
    from qwen15_exp.result import measured_from_logs
    first = launched.first_step_unix if launched else None
    return measured_from_logs(plan.run_dir, plan.layout.devices, plan.layout.tokens_per_step,
                              first - process_start if first else None, launched.call_s if launched else 0.0,
                              launched.peak_rss_mb if launched else 0.0)


def training_settings(exp) -> dict | None:
    """What people change first and read back: the learning rate, its schedule, the steps, the base weights."""
    ph = exp.phase
    if not ph.trains:
        return None
    return {"learning_rate": ph.lr_schedule.learning_rate, "lr_schedule": ph.lr_schedule.type,
            "max_steps": ph.max_steps, "epochs": ph.epochs, "load_checkpoint": ph.load_checkpoint or None,
            "lora_rank": ph.lora.rank if ph.lora is not None else None}


def checkpoint_info(run_dir: Path, ranks: int) -> dict | None:
    from qwen15_exp.weights.run_checkpoints import latest_complete
    point = latest_complete(run_dir, ranks)
    return {"step": point.step, "file": point.files[0]} if point else None


def run(cfg, run_dir: Path, process_start: float | None = None, show_progress: bool = True,
        brief: bool = False) -> dict:
    """One run, start to end. Whatever stops it, result.json says how it ended (ok, planned, interrupted,
    failed, invalid); the exception, if any, goes on to the caller after that. The summary goes to
    <run_dir>/summary.txt and the terminal; `brief` (a sweep's job) shows one line instead.
    `process_start` (time.time() when the process started) is what "first step at" counts from; without
    it, from this call."""
    from qwen15_exp.launch.start import reset_peak_rss
    reset_peak_rss()                      # each job of a sweep its own peak
    t0 = time.time()
    process_start = process_start or t0
    run_dir = Path(run_dir)
    result: dict = {"status": "starting", "run_dir": str(run_dir), "config_sha": config_sha(cfg)}
    request = StopRequest()
    try:
        with stop_on_signals(request):        # before training starts, a signal stops the run at once
            plan_and_execute(cfg, run_dir, result, request, process_start, show_progress)
    except RunInterrupted as e:
        trains = bool((result.get("plan") or {}).get("tokens_per_step"))
        if trains:                        # the terminal says it too, not only result.json
            e.args = (f"{e}; continue with: python -m qwen15_exp resume={shlex.quote(str(run_dir))}",)
        record_unfinished(result, "interrupted", str(e), t0)
        raise
    except UserError as e:
        record_unfinished(result, "invalid", str(e), t0)
        raise
    except Exception as e:
        point = result.get("checkpoint")
        hint = (f"; its newest complete checkpoint is step {point['step']} ({point['file']}): continue with "
                f"python -m qwen15_exp resume={shlex.quote(str(run_dir))}" if point else "")
        record_unfinished(result, "failed", f"{type(e).__name__}: {e}{hint}", t0)
        raise
    result["wall_time_s"] = round(time.time() - t0, 3)
    write_json(run_dir / run_files.RESULT, result)
    summary = summary_text(result)
    write_text(run_dir / run_files.SUMMARY, summary + "\n")
    print(job_line(result) if brief else summary, flush=True)
    return result


def plan_and_execute(cfg, run_dir: Path, result: dict, request, process_start: float, show_progress: bool):
    """compose -> layout -> validate -> (resume) -> data -> weights -> plan -> launch, filling `result`.
    The layout, the hardware adaptations, the launch choice and the memory estimate are computed once here
    and handed to every step. Returns the plan."""
    exp = compose.to_experiment(cfg)
    result.update(experiment=exp.experiment_name, model=exp.model.name, phase=exp.phase.name,
                  hardware=exp.hardware.name)
    if is_run_dir(exp.phase.load_checkpoint):     # an earlier run's dir: its newest complete checkpoint
        exp.phase.load_checkpoint = checkpoint_of_run_dir(exp.phase.load_checkpoint)
    layout = layout_of(exp)
    adapted = adapt(exp)
    choice = choose_launcher(exp, layout)
    result["parallel"] = layout.name
    memory = estimate_memory(exp, layout, adapted)
    problems = validate(exp, layout, memory, choice.executes)
    if problems:
        raise InvalidExperiment(problems)
    resume = None
    if exp.resume:
        from qwen15_exp.resume import resume_point
        resume = resume_point(exp, run_dir, layout)
    benchmark = spec_of(exp) if runs_benchmark(exp) else None     # here: where the command was typed
    if benchmark and choice.executes:     # the tasks and their data, before any weights or model
        load_tasks(benchmark)
    dataset = prepare_dataset(exp, show_progress) if choice.executes else None
    eval_dataset = prepare_eval_dataset(exp, show_progress) if choice.executes else None
    resolve_checkpoint(exp, layout.devices, show_progress)   # a Hugging Face folder: converted once, cached, every launcher
    plan = make_plan(exp, run_dir, dataset, layout, memory, resume=resume, eval_dataset=eval_dataset,
                     adapted=adapted, choice=choice)
    yaml_path = write_text(run_dir / run_files.MINDFORMERS_YAML, dump_yaml(plan.mindformers))
    write_json(run_dir / run_files.PLAN, {**plan.summary(), "model": asdict(exp.model)})
    if exp.phase.export:
        if exp.hardware.device_target == "Ascend":     # MindSpore Lite's GE options, for the exported graphs
            from qwen15_exp.launch.export import lite_ini
            write_text(run_dir / "lite.ini", lite_ini(exp.launch.rank_table))
    elif exp.phase.run_mode == "predict":      # the YAML's processor names tokenizer.json, beside it
        write_predict_files(plan, exp)
    elif benchmark:                            # the harness's settings, for the launch (a plan's worker too)
        write_json(spec_file(run_dir), benchmark)
    result.update(hardware_changes={k: [str(a), str(b)] for k, (a, b) in compose.hardware_changes(exp.hardware).items()},
                  training=training_settings(exp))
    result.update(plan=plan.summary(), data=asdict(dataset) if dataset else None, reference=dict(exp.reference),
                  versions=versions(), measured=None, resumed_from_step=resume.step if resume else None)
    if not plan.executes:
        from qwen15_exp.launch.msrun import write_launch_files
        result["launch_scripts"] = [str(p) for p in write_launch_files(plan, exp)]
        result["launch_by"] = "rank_table" if exp.launch.rank_table else "msrun"
        if exp.launch.k8s.enabled:
            from qwen15_exp.launch.k8s import job_name, submit_lines, write_k8s_files
            path = str(write_k8s_files(plan, exp))
            result["k8s"] = {"manifest": path, "job": job_name(exp, run_dir), "namespace": exp.launch.k8s.namespace,
                             "networking": "rank_table" if exp.launch.k8s.rank_table else "msrun",
                             "submit": submit_lines(path, exp, run_dir)}
        result["status"] = "planned"
    else:
        execute(plan, exp, yaml_path, result, request, process_start)
    return plan


def execute(plan, exp, yaml_path: Path, result: dict, request, process_start: float) -> None:
    """Launch with result.json saying `running` meanwhile; SIGINT/SIGTERM stop at a step, checkpointed."""
    run_dir, train = Path(plan.run_dir), exp.phase.trains
    write_json(run_dir / run_files.RESULT, {**result, "status": "running", "pid": os.getpid()})
    launched = None
    from qwen15_exp.compile_cache import PATH, cached_graphs, is_shared, prune, reuse_word
    cache = plan.env.get(PATH)
    if cache and is_shared(cache):
        prune(cache, exp.launch.compile_cache_max_gb * 2**30)
    graphs_before = cached_graphs(cache) if cache else {}
    try:
        launched = launch(plan, exp, yaml_path, request)
    finally:                                # whatever happened, keep the curve and name the checkpoint
        if cache:
            result["compile_cache"] = {"dir": cache, "use": reuse_word(graphs_before, cached_graphs(cache))}
        if train:
            result["measured"] = training_figures(plan, launched, process_start)
            if launched is None:          # a save cut short (a full disk, a kill) leaves a partial file: not a checkpoint
                from qwen15_exp.weights.run_checkpoints import checkpoint_root, clean_partial
                clean_partial(checkpoint_root(run_dir))
            result["checkpoint"] = checkpoint_info(run_dir, plan.layout.devices)
    if not train:
        result["measured"] = launched.figures
        if launched.benchmark:
            result["benchmark"] = launched.benchmark
        if launched.generated:
            result["generated"] = launched.generated
    if launched.node_rank is not None:
        result.update(node_rank=launched.node_rank, ranks_here=launched.ranks_here)
    if request():
        step = (result.get("checkpoint") or {}).get("step")
        raise RunInterrupted(f"stopped by {request.name}" + (f" at step {step} (checkpoint saved)" if step else ""),
                             request.signal)
    result["status"] = "ok"
    if exp.hardware.device_target == "CPU":
        recalibrate(result)
    if train:
        from qwen15_exp.weights.run_checkpoints import checkpoint_root, prune
        prune(checkpoint_root(run_dir), exp.phase.checkpoint.keep_after_success)
        # MindFormers' save_trainable_params folder (LoRA's adapters alone) keeps as many
        prune(run_files.output_dir(run_dir) / "checkpoint_trainable", exp.phase.checkpoint.keep_after_success)
        if exp.phase.checkpoint.keep_after_success == 0:
            result["checkpoint"] = None


MIN_STEPS_TO_RECALIBRATE = 12


def recalibrate(result: dict) -> None:
    """A CPU run long enough to judge checks the estimate's calibration (estimate/cpu_calibration.py)."""
    from qwen15_exp.estimate.cpu_calibration import check_against_run
    est = (result.get("plan") or {}).get("throughput") or {}
    measured = result.get("measured") if isinstance(result.get("measured"), dict) else {}
    if (measured.get("steps") or 0) < MIN_STEPS_TO_RECALIBRATE:
        return                            # the first steps run slow while caches warm: too few to judge by
    check = check_against_run(est.get("tokens_per_s"), measured.get("tokens_per_s"), est.get("uncertainty") or 0.2)
    if check:
        result["calibration"] = check


def record_unfinished(result: dict, status: str, error: str, t0: float) -> None:
    """Write result.json for a run that did not end ok: its status, the first line of the error, its class."""
    from qwen15_exp.launch.msrun import worker_log_tail
    log = worker_log_tail(Path(result["run_dir"]))
    result.update(status=status, error=error, reason=first_line(error),
                  failure_class=classify_failure(error, log) if status == "failed" else None,
                  wall_time_s=round(time.time() - t0, 3))
    result.pop("pid", None)
    write_json(Path(result["run_dir"]) / run_files.RESULT, result)
