"""After a planned run's node scripts: node 0 turns the plan's result.json (`planned`) into the run's.

`python -m qwen15_exp.collect <run dir> --exit-code N --started UNIX` (launch_node0.sh calls it when msrun
ends): the status from msrun's exit code, the loss curve and step times of every rank whose step log node 0
sees (all of them on shared storage, its own ranks otherwise), the checkpoint kept, and the summary.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qwen15_exp import run_files
from qwen15_exp.atomic import write_json, write_text
from qwen15_exp.errors import UserError


def ranks_seen(run_dir: Path, devices: int) -> int:
    """How many ranks, from 0 on, left a step log here."""
    n = 0
    while n < devices and run_files.steps_log(run_dir, n).is_file():
        n += 1
    return n


def collect(run_dir: Path, exit_code: int, started_unix: float | None) -> dict:
    import json
    from qwen15_exp.result import measured_from_logs
    path = run_dir / run_files.RESULT
    if not path.is_file():
        raise UserError(f"{path} is missing: run this in the run dir of a plan (where launch_node0.sh is)")
    result = json.loads(path.read_text())
    plan = result.get("plan") or {}
    devices = int(plan.get("devices") or 1)
    seen = ranks_seen(run_dir, devices)
    records = run_files.rank_records(run_dir)
    wall = time.time() - started_unix if started_unix else None
    if seen:
        firsts = [r["first_step_unix"] for r in records if r.get("first_step_unix")]
        first = max(firsts) - started_unix if firsts and started_unix else None
        peak = max((r.get("peak_rss_mb", 0.0) for r in records), default=0.0)
        result["measured"] = measured_from_logs(run_dir, seen, int(plan.get("tokens_per_step") or 0), first,
                                                wall or 0.0, peak)
        result["measured"]["ranks_collected"] = f"{seen} of {devices}"
    result["status"] = "ok" if exit_code == 0 else "failed"
    if exit_code:
        result["error"] = result["reason"] = (f"msrun exited with {exit_code}; logs in "
                                              f"{run_dir / 'msrun_log'}")
    else:
        result.pop("error", None)
        result.pop("reason", None)
    if wall is not None:
        result["wall_time_s"] = round(wall, 3)
    if int(plan.get("tokens_per_step") or 0) and seen:       # a training run
        from qwen15_exp.weights.run_checkpoints import latest_complete
        point = latest_complete(run_dir, devices)       # as run.checkpoint_info, without run.py's imports
        if point:
            result["checkpoint"] = {"step": point.step, "file": point.files[0]}
    return result


def main(argv=None) -> int:
    from qwen15_exp.result import summary_text
    ap = argparse.ArgumentParser(prog="python -m qwen15_exp.collect", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--exit-code", type=int, required=True, help="msrun's exit code on node 0")
    ap.add_argument("--started", type=float, default=None, help="when the node script started (Unix seconds)")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    try:
        result = collect(run_dir, args.exit_code, args.started)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["run_dir"] = str(run_dir)
    write_json(run_dir / run_files.RESULT, result)
    summary = summary_text(result)
    write_text(run_dir / run_files.SUMMARY, summary + "\n")
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
