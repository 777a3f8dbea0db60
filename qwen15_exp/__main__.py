"""`python -m qwen15_exp [overrides]`: compose a Qwen1.5 experiment with Hydra and run or plan it.

Examples:
    python -m qwen15_exp                                   # tiny model, finetune, on this CPU
    python -m qwen15_exp model=72b phase=finetune parallel=mp8pp4
    python -m qwen15_exp -m model=0_5b,1_8b,4b hardware=atlas_800t_a2
"""
from __future__ import annotations

import time

PROCESS_T0 = time.time()

import sys  # noqa: E402

from qwen15_exp.cli import report_user_error, run_app, user_error_message  # noqa: E402

_failed_jobs: list[str] = []


def task(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from qwen15_exp.atomic import write_json
    from qwen15_exp.run import run

    run_dir = HydraConfig.get().runtime.output_dir
    if HydraConfig.get().mode.name != "MULTIRUN":
        return run(cfg, run_dir, PROCESS_T0)
    # in a sweep one bad or failed job must not hide the others: record it, finish, exit non-zero at the end
    try:
        return run(cfg, run_dir, PROCESS_T0)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            import traceback
            traceback.print_exc()
            _failed_jobs.append(run_dir)
        else:
            report_user_error(message)
        write_json(f"{run_dir}/result.json", {"status": "invalid" if message else "failed",
                                              "error": message or f"{type(e).__name__}: {e}", "run_dir": run_dir})
        return None


def main() -> None:
    from qwen15_exp.compose import group_options, register
    from qwen15_exp.layout_names import explain

    register()
    message = explain(sys.argv[1:], group_options("parallel"))
    if message:
        report_user_error(message)
        sys.exit(2)
    run_app("config", task)
    if _failed_jobs:
        report_user_error(f"{len(_failed_jobs)} job(s) failed: {', '.join(_failed_jobs)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
