"""One run, straight through: compose -> layout -> validate -> data -> weights -> plan -> launch -> result.

The layout (with the launcher decision) and the memory estimate are computed once here and handed on.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import yaml

from qwen15_exp import compose
from qwen15_exp.atomic import write_json, write_text
from qwen15_exp.errors import UserError
from qwen15_exp.estimate.memory import estimate_memory
from qwen15_exp.layout import layout_of
from qwen15_exp.plan import Dataset, make_plan
from qwen15_exp.result import summary_text, versions
from qwen15_exp.validate import InvalidExperiment, validate
from qwen15_exp.weights.checkpoint import resolve_checkpoint


def prepare_dataset(exp, show_progress: bool = True) -> Dataset | None:
    """The MindRecord the run trains on: a raw file prepared (and cached), or a given MindRecord."""
    if exp.phase.run_mode == "predict" or exp.data.format == "none":
        return None
    if exp.data.format == "mindrecord":
        from qwen15_exp.data.mindrecord import inspect_mindrecord
        folder, columns, rows, width = inspect_mindrecord(Path(exp.data.input))
        if width != exp.data.seq_length + 1:
            raise UserError(f"{exp.data.input} holds rows of {width} tokens, but data.seq_length="
                            f"{exp.data.seq_length} needs {exp.data.seq_length + 1}; set data.seq_length={width - 1}")
        return Dataset(str(folder), tuple(columns), rows)
    from qwen15_exp.data.prepare import prepare, summary_lines
    prepared = prepare(exp.data, exp.data.seq_length, show_progress=show_progress)
    print(f"data: {'reused the cached' if prepared.reused else 'prepared'} MindRecord {prepared.folder}")
    for line in summary_lines(prepared.summary):
        print(f"  {line}")
    return Dataset(str(prepared.folder), tuple(prepared.summary["columns"]), prepared.rows)


def write_predict_files(plan, exp) -> None:
    """tokenizer.json and the prompts (ChatML-wrapped for chat) a predict plan's workers read."""
    from qwen15_exp.data.chatml import chat_prompt, eos_token
    from qwen15_exp.data.tokenizer import save_tokenizer_json
    run_dir = Path(plan.run_dir)
    save_tokenizer_json(run_dir / "tokenizer.json", exp.data.tokenizer_dir or None)
    prompts = list(exp.phase.predict_data)
    if exp.phase.chat:
        prompts = [chat_prompt(exp.phase.system_prompt, p) for p in prompts]
    g = exp.phase.generation
    write_json(run_dir / "predict_data.json", {
        "inputs": prompts, "eos_token": eos_token(exp.phase.chat),
        "max_length": g.max_decode_length if g.max_new_tokens is None else None})


def dump_yaml(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110)


def run(cfg, run_dir: Path, process_t0: float, show_progress: bool = True) -> dict:
    t0 = time.time()
    exp = compose.to_experiment(cfg)
    layout = layout_of(exp)
    memory = estimate_memory(exp, layout)
    problems = validate(exp, layout, memory)
    if problems:
        raise InvalidExperiment(problems)
    run_dir = Path(run_dir)
    dataset = prepare_dataset(exp, show_progress) if layout.executes else None
    resolve_checkpoint(exp, show_progress)       # a Hugging Face folder: converted once, cached, every launcher
    plan = make_plan(exp, run_dir, dataset, layout, memory)
    yaml_path = write_text(run_dir / "mindformers.yaml", dump_yaml(plan.mindformers))
    write_json(run_dir / "plan.json", plan.summary())
    if exp.phase.run_mode == "predict":        # the YAML's processor names tokenizer.json, beside it
        write_predict_files(plan, exp)
    result = {
        "status": "planned", "experiment": exp.experiment_name, "model": exp.model.name,
        "phase": exp.phase.name, "parallel": layout.name, "hardware": exp.hardware.name,
        "run_dir": str(run_dir), "plan": plan.summary(), "data": asdict(dataset) if dataset else None,
        "reference": dict(exp.reference), "versions": versions(), "measured": None,
    }
    if plan.launcher == "local" and exp.phase.run_mode == "predict":
        from qwen15_exp.launch.local import run_predict
        result["measured"], result["generated"] = run_predict(plan, exp)
        result["status"] = "ok"
    elif plan.launcher == "local":
        from qwen15_exp.launch.local import run_local
        result["measured"] = run_local(plan, yaml_path, process_t0)
        result["status"] = "ok"
    elif plan.launcher == "msrun":
        from qwen15_exp.launch.msrun import run_msrun
        result["measured"] = run_msrun(plan, exp, yaml_path, process_t0)
        result["status"] = "ok"
    else:
        from qwen15_exp.launch.msrun import write_launch_files
        result["launch_scripts"] = [str(p) for p in write_launch_files(plan, exp)]
    result["wall_time_s"] = round(time.time() - t0, 3)
    write_json(run_dir / "result.json", result)
    print(summary_text(result), flush=True)
    return result
