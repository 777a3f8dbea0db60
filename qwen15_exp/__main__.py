"""`python -m qwen15_exp [overrides]`: compose a Qwen1.5 experiment with Hydra and run or plan it.

Examples:
    python -m qwen15_exp                                   # tiny model, finetune, on this CPU
    python -m qwen15_exp model=72b phase=finetune parallel=mp8pp4
    python -m qwen15_exp -m model=0_5b,1_8b,4b hardware=atlas_800t_a2
    python -m qwen15_exp resume=<run dir>                  # continue a run from its last checkpoint
"""
from __future__ import annotations

import time

PROCESS_START = time.time()     # "first step at" counts from here

import sys  # noqa: E402

from qwen15_exp.cli import report_user_error, run_app, user_error_message  # noqa: E402

_jobs: dict = {"started": 0, "failed": []}


def task(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from qwen15_exp.lifecycle import RunInterrupted
    from qwen15_exp.run import run

    run_dir = HydraConfig.get().runtime.output_dir
    if "tracking" in cfg:
        from qwen15_exp.errors import UserError
        from qwen15_exp.tracking import bound_retries, unreachable_store
        bound_retries()
        problem = unreachable_store(cfg)
        if problem:
            raise UserError(problem + "; nothing was run")
    process_start = PROCESS_START if _jobs["started"] == 0 else None   # later jobs of a sweep: from their start
    _jobs["started"] += 1
    if HydraConfig.get().mode.name != "MULTIRUN":
        return run(cfg, run_dir, process_start)
    from qwen15_exp.sweep import finished_result
    done = finished_result(run_dir, cfg)
    if done is not None:                      # a sweep run again into its own dir: keep what ended ok
        print(f"job {HydraConfig.get().job.num}: already {done['status']} in {run_dir}; kept")
        return done
    from qwen15_exp.console import PROGRESS
    PROGRESS.update(label=f"job {HydraConfig.get().job.num}", leave=False)    # then its one summary line
    # in a sweep one bad or failed job must not hide the others: run() recorded it, finish, exit non-zero
    try:
        return run(cfg, run_dir, process_start, show_progress=False, brief=True)
    except RunInterrupted:
        raise                                 # a signal to the sweep stops the sweep (cli.py exits)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            import traceback
            traceback.print_exc()
        else:
            report_user_error(message)
        _jobs["failed"].append(run_dir)
        return None


def command_line(argv: list[str]) -> list[str]:
    """resume=<run dir> becomes that run's overrides; parallel=<degrees> without a layout file is explained."""
    from qwen15_exp.compose import explain_unknown_layout, group_options
    from qwen15_exp.errors import UserError
    from qwen15_exp.resume import resume_argv
    argv = resume_argv(argv)
    message = explain_unknown_layout(argv, group_options("parallel"))
    if message:
        raise UserError(message)
    return argv


def main() -> None:
    run_app("config", task, prepare_argv=command_line)
    from qwen15_exp.report import FAILED_JOBS
    failed = sorted(set(_jobs["failed"]) | set(FAILED_JOBS))      # FAILED_JOBS: jobs run by other processes too
    if failed:
        report_user_error(f"{len(failed)} job(s) did not end ok (see sweep_report.md): {', '.join(failed)}")
        sys.exit(1)
    from qwen15_exp.tracking import TRACKING_FAILED
    if TRACKING_FAILED:
        report_user_error(f"the run ended ok but MLflow could not log {len(TRACKING_FAILED)} of its parts "
                          "(see above): check tracking.uri / MLFLOW_TRACKING_URI")
        sys.exit(1)


if __name__ == "__main__":
    main()
