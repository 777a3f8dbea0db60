"""Which launcher runs a plan: in this process, msrun here, or only a written plan. Probes this machine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LaunchChoice:
    launcher: str                  # local | msrun | plan
    executes: bool                 # runs on this machine (local, msrun) or is only written (plan)
    why: str                       # how the launcher was chosen, in words


def npus_present() -> bool:
    """Ascend NPUs visible on this machine (the driver's device nodes)."""
    return any(Path("/dev").glob("davinci[0-9]*"))


def choose_launcher(exp, layout, npus: bool | None = None) -> LaunchChoice:
    """local | msrun | plan for this experiment and layout; `npus` defaults to probing this machine."""
    hw = exp.hardware
    if exp.launch.mode == "plan":
        return LaunchChoice("plan", False, "launch.mode=plan: files written, nothing executed")
    if exp.launch.rank_table:
        return LaunchChoice("plan", False, "launch.rank_table: one script per server starts a worker per device of "
                                           "the table; run them on the servers")
    if hw.device_target == "CPU":
        if layout.devices > 1 or exp.launch.mode == "msrun":
            return LaunchChoice("msrun", True, f"{layout.devices} CPU workers started by msrun on this machine")
        what = "MindFormers generate" if exp.phase.run_mode == "predict" else "MindFormers Trainer"
        if exp.phase.run_mode == "eval" and exp.eval.tasks:
            what = "lm-evaluation-harness over the MindFormers network"
        return LaunchChoice("local", True, f"in-process {what} on this machine's CPU")
    if npus_present() if npus is None else npus:
        return LaunchChoice("msrun", True, f"Ascend NPUs present: msrun on {layout.nodes} node(s)")
    return LaunchChoice("plan", False, (f"hardware={hw.name} targets Ascend NPUs and this machine has none "
                                        "(no /dev/davinci*): the run is planned and its files written; nothing "
                                        "was executed"))
