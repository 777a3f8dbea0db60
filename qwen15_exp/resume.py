"""`python -m qwen15_exp resume=<run dir>`: continue a run from its last complete checkpoint.

The run is composed again from its own saved overrides (its .hydra/overrides.yaml) plus any new ones, into
the same run dir. New overrides may change how it runs (steps, logging, launch) but not the model or the
layout: the checkpoint holds that model, sharded for that layout. MindFormers' own resume then restores
weights, optimizer state, step, learning rate and data position; the steps logs are cut back to the
checkpoint's step, so result.json shows one curve numbered as an uninterrupted run.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from qwen15_exp.errors import UserError
from qwen15_exp.lifecycle import STOP_FILE, read_steps, run_status

from qwen15_exp.weights.run_checkpoints import Checkpoint, checkpoint_root, clean_partial, latest_complete
from qwen15_exp import run_files


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_argv(argv: list[str]) -> list[str]:
    """The command line of `resume=<dir> [overrides]`: the run's saved overrides, the new ones, its dir."""
    found = [a for a in argv if a.startswith("resume=")]
    if not found:
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise UserError("resume=<run dir> continues one run; to finish a sweep, run the same sweep again with "
                        "hydra.sweep.dir=<sweep dir>: jobs that ended ok are kept, the others run again")
    run_dir = Path(found[-1].split("=", 1)[1]).expanduser().resolve()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise UserError(f"resume={run_dir}: not a qwen15_exp run dir (no .hydra/overrides.yaml); give the folder a "
                        "run printed as 'files: ...'")
    new = [a for a in argv if not a.startswith("resume=")]
    new_keys = {_key(a) for a in new if "=" in a}
    old = [o for o in (yaml.safe_load(saved.read_text()) or []) if _key(o) not in new_keys and _key(o) != "resume"]
    quoted_dir = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    # Hydra would rewrite the run's .hydra/ before we can check the overrides: it stays off, and
    # record_overrides() writes the accepted ones once resume_point() has found them compatible
    return old + new + [f"resume='{quoted_dir}'", f"hydra.run.dir='{quoted_dir}'", "hydra.output_subdir=null"]


def record_overrides(run_dir: Path) -> None:
    """The overrides the run now continues with, for the next resume."""
    from hydra.core.hydra_config import HydraConfig

    from qwen15_exp.atomic import write_text
    if not HydraConfig.initialized():
        return
    overrides = [o for o in HydraConfig.get().overrides.task if _key(o) != "resume"]
    write_text(run_dir / ".hydra" / "overrides.yaml", yaml.safe_dump(list(overrides), allow_unicode=True))


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_same_run(exp, run_dir: Path, layout) -> dict:
    plan_path = run_dir / run_files.PLAN
    if not plan_path.is_file():
        raise UserError(f"resume={run_dir}: the run never got as far as a plan; start it again instead")
    previous = json.loads(plan_path.read_text())
    changed = _differences(previous.get("model", {}), asdict(exp.model))
    if changed:
        raise UserError(f"resume={run_dir}: the overrides change the model ({', '.join('model.' + k for k in changed)});"
                        " a run continues with the model its checkpoints hold; start a new run for another model")
    if previous.get("layout") != layout.name:
        raise UserError(
            f"resume={run_dir}: the run was started as {previous.get('layout')} and would continue as {layout.name}. "
            "Its checkpoints are one per rank for that layout, and MindFormers can only rescale the step, not "
            "re-split the data position and the per-rank files of a data-parallel run: resume with the original "
            f"parallel layout (parallel={previous.get('layout')}), or start a new run from the checkpoint with "
            "phase.load_checkpoint=<checkpoint file>")
    return previous


def cut_steps_logs(run_dir: Path, last_step: int) -> None:
    """Drop the steps after the checkpoint from every rank's steps log: they are trained again."""
    from qwen15_exp.atomic import write_text
    for log in run_dir.glob(run_files.STEPS_GLOB):
        kept = [r for r in read_steps(log) if r["step"] <= last_step]
        write_text(log, "".join(json.dumps(r) + "\n" for r in kept))


def resume_point(exp, run_dir: Path, layout) -> Checkpoint | None:
    """The checkpoint to continue from (None: no complete checkpoint, start again from step 0)."""
    run_dir = Path(run_dir)
    check_same_run(exp, run_dir, layout)
    status = run_status(run_dir)
    if status.get("status") != "ok":
        record_overrides(run_dir)
    if status.get("status") == "ok":
        raise UserError(f"resume={run_dir}: that run finished (status ok); there is nothing to continue")
    removed = clean_partial(checkpoint_root(run_dir))
    if removed:
        print(f"resume: removed {len(removed)} partial checkpoint file(s) left by a kill during a save")
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    point = latest_complete(run_dir, layout.devices)
    if point is None:
        print(f"resume: no complete checkpoint in {checkpoint_root(run_dir)}; training again from step 0")
        cut_steps_logs(run_dir, 0)
        return None
    if exp.phase.max_steps and point.step >= exp.phase.max_steps:
        raise UserError(f"resume={run_dir}: its checkpoint is at step {point.step}, which is phase.max_steps="
                        f"{exp.phase.max_steps}; raise phase.max_steps to train on")
    cut_steps_logs(run_dir, point.step)
    was = ("its result.json was unreadable" if status.get("status") == "unreadable"
           else f"was {status.get('status')}")
    print(f"resume: {run_dir} from step {point.step} ({point.files[0]}; {was})")
    return point
