"""Plan step: Experiment -> Plan (the MindFormers config, devices, batch, memory, launch decision).

Pure: imports nothing heavy; the data step hands in the prepared dataset (folder, columns, rows).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen15_exp import mindformers_config
from qwen15_exp.errors import UserError
from qwen15_exp.estimate.memory import MemoryEstimate, estimate_memory, total_params
from qwen15_exp.estimate.throughput import ThroughputEstimate, estimate_throughput
from qwen15_exp.layout import choose_launcher, devices, global_batch, nodes


@dataclass(frozen=True)
class Dataset:
    folder: str = ""
    columns: tuple = ("input_ids", "labels")
    rows: int = 0


@dataclass
class Plan:
    run_dir: Path
    launcher: str                  # local | msrun | plan
    executes: bool
    why: str                       # how the launcher was chosen (and why nothing runs, for plans)
    devices: int
    nodes: int
    devices_per_node: int
    global_batch: int
    tokens_per_step: int
    steps: int | None
    params_total: int
    memory: MemoryEstimate
    throughput: ThroughputEstimate | None
    mindformers: dict
    adaptations: list = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("mindformers", "memory", "throughput")}
        d["run_dir"] = str(self.run_dir)
        d["memory"] = self.memory.as_dict()
        d["throughput"] = self.throughput.as_dict() if self.throughput else None
        return d


def training_steps(exp, rows: int) -> tuple[int, int | None, int]:
    """(epochs, stop_step, total_steps) for the dataset at hand and phase.max_steps."""
    gb = global_batch(exp)
    per_epoch = rows // gb
    if per_epoch < 1:
        raise UserError(
            f"the dataset has {rows} rows but one step needs a global batch of {gb} (batch_size="
            f"{exp.phase.batch_size} x data_parallel={exp.parallel.data_parallel}"
            + (f" x micro_batch_num={exp.parallel.micro_batch_num}" if exp.parallel.pipeline_stage > 1 else "")
            + "); give more data or lower phase.batch_size")
    if exp.phase.max_steps:
        epochs = math.ceil(exp.phase.max_steps / per_epoch)
        return epochs, exp.phase.max_steps, exp.phase.max_steps
    return exp.phase.epochs, None, per_epoch * exp.phase.epochs


def make_plan(exp, run_dir: Path, dataset: Dataset | None = None) -> Plan:
    launcher, executes, why = choose_launcher(exp)
    gb = global_batch(exp)
    steps = stop = total = epochs = None
    train = exp.phase.run_mode != "predict"
    if train and dataset is not None and dataset.rows:
        epochs, stop, total = training_steps(exp, dataset.rows)
        steps = total
    # a plan is copied to the cluster: its paths are relative to its own folder
    cfg, adaptations = mindformers_config.build(
        exp, run_dir if executes else Path("."), dataset_dir=dataset.folder if dataset else "", epochs=epochs,
        columns=list(dataset.columns) if dataset else None, stop_step=stop, total_steps=total)
    env = dict(exp.hardware.env)
    if train and exp.phase.run_mode == "finetune" and exp.hardware.device_target == "Ascend":
        env.setdefault("MS_ASCEND_CHECK_OVERFLOW_MODE", "INFNAN_MODE")   # the seed README asks for it
    return Plan(
        run_dir=run_dir, launcher=launcher, executes=executes, why=why, devices=devices(exp),
        nodes=nodes(exp), devices_per_node=exp.hardware.devices_per_node, global_batch=gb,
        tokens_per_step=gb * exp.data.seq_length if train else 0, steps=steps,
        params_total=total_params(exp.model), memory=estimate_memory(exp),
        throughput=estimate_throughput(exp), mindformers=cfg,
        adaptations=adaptations, env=env)
