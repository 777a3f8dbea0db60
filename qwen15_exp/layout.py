"""Where a run goes: device and node counts, the global batch, and which launcher runs it. Pure."""
from __future__ import annotations

from pathlib import Path


def devices(exp) -> int:
    p = exp.parallel
    return p.data_parallel * p.model_parallel * p.pipeline_stage * p.context_parallel


def nodes(exp) -> int:
    if exp.parallel.nodes:
        return exp.parallel.nodes
    per_node = max(1, exp.hardware.devices_per_node)
    return max(1, -(-devices(exp) // per_node))


def global_batch(exp) -> int:
    """Samples per optimizer step: batch x dp x (micro batches under pipeline, else accumulation steps)."""
    p, ph = exp.parallel, exp.phase
    accumulation = p.micro_batch_num if p.pipeline_stage > 1 else ph.gradient_accumulation_steps
    return ph.batch_size * p.data_parallel * accumulation


def npus_present() -> bool:
    """Ascend NPUs visible on this machine (the driver's device nodes)."""
    return any(Path("/dev").glob("davinci[0-9]*"))


def choose_launcher(exp) -> tuple[str, bool, str]:
    """(launcher, executes here, why): local | msrun | plan."""
    hw, n_dev = exp.hardware, devices(exp)
    if exp.launch.mode == "plan":
        return "plan", False, "launch.mode=plan: files written, nothing executed"
    if hw.device_target == "CPU":
        if n_dev > 1 or exp.launch.mode == "msrun":
            return "msrun", True, f"{n_dev} CPU workers started by msrun on this machine"
        what = "generate" if exp.phase.run_mode == "predict" else "Trainer"
        return "local", True, f"in-process MindFormers {what} on this machine's CPU"
    if npus_present():
        return "msrun", True, f"Ascend NPUs present: msrun on {nodes(exp)} node(s)"
    return "plan", False, (f"hardware={hw.name} targets Ascend NPUs and this machine has none "
                           "(no /dev/davinci*): the run is planned and its files written; nothing was executed")
