"""Plan step: Experiment -> Plan (the MindFormers config, the layout, memory and throughput estimates).

Pure: imports nothing heavy; the data step hands in the prepared dataset (folder, columns, rows), and a run
hands in the layout and memory estimate it already computed for validation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from qwen15_exp import mindformers_config
from qwen15_exp.adapt import Adapted, adapt
from qwen15_exp.errors import UserError
from qwen15_exp.estimate.memory import MemoryEstimate, estimate_memory, total_params, trainable_params
from qwen15_exp.estimate.throughput import ThroughputEstimate, estimate_throughput
from qwen15_exp.launch.choose import LaunchChoice, choose_launcher
from qwen15_exp.layout import Layout, layout_of


@dataclass(frozen=True)
class Dataset:
    folder: str = ""
    columns: tuple = ("input_ids", "labels")
    rows: int = 0


@dataclass
class Plan:
    run_dir: Path
    layout: Layout
    choice: LaunchChoice
    steps: int | None
    params_total: int
    params_trainable: int
    memory: MemoryEstimate
    throughput: ThroughputEstimate | None
    mindformers: dict
    adaptations: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    save_steps: int | None = None

    @property
    def launcher(self) -> str:
        return self.choice.launcher

    @property
    def steps_done(self) -> int:
        """Steps made before this segment of a resumed run (0 for a fresh run)."""
        from qwen15_exp.lifecycle import INITIAL_STEP_ENV
        return int(self.env.get(INITIAL_STEP_ENV, 0))

    @property
    def executes(self) -> bool:
        return self.choice.executes

    def summary(self) -> dict:
        L = self.layout
        return {
            "run_dir": str(self.run_dir), "launcher": self.launcher, "executes": self.executes, "why": self.choice.why,
            "layout": L.name, "devices": L.devices, "nodes": L.nodes, "devices_per_node": L.devices_per_node,
            "global_batch": L.global_batch, "tokens_per_step": L.tokens_per_step, "steps": self.steps,
            "params_total": self.params_total, "params_trainable": self.params_trainable, "memory": self.memory.as_dict(),
            "throughput": self.throughput.as_dict() if self.throughput else None,
            "adaptations": list(self.adaptations), "env": dict(self.env), "save_steps": self.save_steps,
        }


def training_steps(exp, layout: Layout, rows: int) -> tuple[int, int | None, int]:
    """(epochs, stop_step, total_steps) for the dataset at hand and phase.max_steps."""
    gb = layout.global_batch
    per_epoch = rows // gb
    if per_epoch < 1:
        raise UserError(
            f"the dataset has {rows} rows but one step needs a global batch of {gb} (batch_size="
            f"{exp.phase.batch_size} x data_parallel={layout.data_parallel}"
            + (f" x micro_batch_num={layout.micro_batch_num}" if layout.pipeline_stage > 1 else "")
            + (f" x micro_batch_interleave_num={exp.parallel.micro_batch_interleave_num}"
               if exp.parallel.micro_batch_interleave_num > 1 else "")
            + "); give more data or lower phase.batch_size")
    if exp.phase.max_steps:
        epochs = math.ceil(exp.phase.max_steps / per_epoch)
        return epochs, exp.phase.max_steps, exp.phase.max_steps
    return exp.phase.epochs, None, per_epoch * exp.phase.epochs


def checkpoint_interval(exp, step_s: float | None, total_steps: int | None) -> int:
    """phase.checkpoint.save_steps, or every `every_minutes` of estimated step time, and never only at the end
    (at least one checkpoint half way through)."""
    ck = exp.phase.checkpoint
    if ck.save_steps:
        return ck.save_steps
    every = max(1, round(ck.every_minutes * 60 / step_s)) if step_s else 1000
    if total_steps:
        every = min(every, max(1, total_steps // 2))
    return every


def run_env(exp, resume=None) -> dict:
    env = dict(exp.hardware.env)
    if resume is not None:
        from qwen15_exp.lifecycle import INITIAL_STEP_ENV
        env[INITIAL_STEP_ENV] = str(resume.step)
    if exp.phase.run_mode == "finetune" and exp.hardware.device_target == "Ascend":
        env.setdefault("MS_ASCEND_CHECK_OVERFLOW_MODE", "INFNAN_MODE")   # the seed README asks for it
    if exp.hardware.device_target == "Ascend":
        L = exp.launch
        env.setdefault("HCCL_CONNECT_TIMEOUT", str(L.hccl_connect_timeout))
        env.setdefault("HCCL_EXEC_TIMEOUT", str(L.hccl_exec_timeout))
        if L.socket_ifname:
            env.setdefault("HCCL_SOCKET_IFNAME", L.socket_ifname)
            env.setdefault("GLOO_SOCKET_IFNAME", L.socket_ifname)
    return env


def make_plan(exp, run_dir: Path, dataset: Dataset | None = None, layout: Layout | None = None,
              memory: MemoryEstimate | None = None, resume=None, eval_dataset: Dataset | None = None,
              adapted: Adapted | None = None, choice: LaunchChoice | None = None) -> Plan:
    """The plan of one run. A run hands in the layout, adaptations, launch choice and memory estimate it
    computed once; alone (tests, tools) they are computed here."""
    L = layout or layout_of(exp)
    adapted = adapted or adapt(exp)
    choice = choice or choose_launcher(exp, L)
    throughput = estimate_throughput(exp, L, adapted)
    steps = stop = total = epochs = None
    if exp.phase.trains and dataset is not None and dataset.rows:
        epochs, stop, total = training_steps(exp, L, dataset.rows)
        steps = total
    if exp.phase.trains and stop is None and exp.phase.max_steps:
        stop = total = steps = exp.phase.max_steps        # a plan without the dataset keeps its stop step
    save_steps = checkpoint_interval(exp, throughput.step_s if throughput else None, total)
    # a plan is copied to the cluster: its paths are relative to its own folder
    cfg = mindformers_config.build(
        exp, run_dir if choice.executes else Path("."), dataset_dir=dataset.folder if dataset else "", epochs=epochs,
        columns=list(dataset.columns) if dataset else None, stop_step=stop, total_steps=total, layout=L,
        adapted=adapted, save_steps=save_steps, resume=resume,
        eval_dataset_dir=eval_dataset.folder if eval_dataset else "",
        eval_columns=list(eval_dataset.columns) if eval_dataset else None)
    env = run_env(exp, resume)
    # a benchmark builds up to two networks in whichever order its tasks ask (scoring, generation): a graph cached
    # by one order fed garbage indices to the other (Gather out of range), so it compiles afresh
    if exp.launch.compile_cache and not (exp.phase.run_mode == "eval" and exp.eval.tasks):
        from qwen15_exp.compile_cache import cache_env
        env.update(cache_env(cfg, run_dir if choice.executes else Path("."), env, choice.executes))
    return Plan(run_dir=run_dir, layout=L, choice=choice, steps=steps, params_total=total_params(exp.model),
                params_trainable=trainable_params(exp.model, exp.phase.lora) if exp.phase.trains else 0,
                memory=memory or estimate_memory(exp, L, adapted), throughput=throughput, mindformers=cfg,
                adaptations=list(adapted.notes), env=env, save_steps=save_steps)
