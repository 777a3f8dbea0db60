"""Launch step: one entry, `launch(plan, exp, yaml_path, request) -> Launched`.

It dispatches once on (launcher, what the run does) and always returns the same record, whatever ran:
in this process (Trainer, evaluate, generate, export) or through msrun (one or many CPU workers, NPUs).
Only this package imports MindSpore and MindFormers on the run path, and only inside the functions that run.
"""
from __future__ import annotations

from pathlib import Path

from qwen15_exp.launch.launched import Launched


def kind_of(exp) -> str:
    if exp.phase.export:
        return "export"
    if exp.phase.run_mode == "eval" and exp.eval.tasks:
        return "benchmark"
    return {"predict": "predict", "eval": "eval"}.get(exp.phase.run_mode, "train")


def launch(plan, exp, yaml_path: Path, request) -> Launched:
    """Run the plan here: in this process, or through msrun (CPU workers, or NPUs when present)."""
    kind = kind_of(exp)
    if plan.launcher == "msrun":
        from qwen15_exp.launch.msrun import run_msrun
        return run_msrun(plan, exp, kind, request)
    from qwen15_exp.launch import local
    return {"train": local.run_train, "eval": local.run_eval, "benchmark": local.run_benchmark,
            "predict": local.run_predict, "export": local.run_export}[kind](plan, exp, yaml_path, request)
