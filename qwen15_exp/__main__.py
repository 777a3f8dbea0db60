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

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import MissingMandatoryValue  # noqa: E402

from qwen15_exp.compose import conf_dir, register_resolvers  # noqa: E402
from qwen15_exp.errors import UserError  # noqa: E402
from qwen15_exp.schema import register_configs  # noqa: E402

_task_started = False
_failed_jobs: list[str] = []


def _report_user_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> dict | None:
    global _task_started
    _task_started = True
    from qwen15_exp.io import write_json
    from qwen15_exp.run import run

    run_dir = HydraConfig.get().runtime.output_dir
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        return run(cfg, run_dir, PROCESS_T0)
    except MissingMandatoryValue as e:
        message = f"{e.full_key} is required and has no value; set it on the command line ({e.full_key}=...)"
    except UserError as e:
        message = str(e)
    except Exception as e:
        if not multirun:
            raise
        # one failed job must not hide the others: record it, finish the sweep, exit non-zero at the end
        import traceback
        traceback.print_exc()
        _failed_jobs.append(run_dir)
        write_json(f"{run_dir}/result.json", {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                              "run_dir": run_dir})
        return None
    if multirun:           # one bad job must not stop the sweep; the report shows it
        _report_user_error(message)
        write_json(f"{run_dir}/result.json", {"status": "invalid", "error": message, "run_dir": run_dir})
        return None
    _report_user_error(message)
    sys.exit(2)


def main() -> None:
    register_resolvers()
    register_configs()
    from qwen15_exp.compose import group_options
    from qwen15_exp.layout_names import explain
    message = explain(sys.argv[1:], group_options("parallel"))
    if message:
        _report_user_error(message)
        sys.exit(2)
    try:
        app()
        if _failed_jobs:
            print(f"error: {len(_failed_jobs)} job(s) failed: {', '.join(_failed_jobs)}", file=sys.stderr)
            sys.exit(1)
    except SystemExit as e:
        # Hydra reports a bad override or an unknown group option itself and exits with 1, before our task
        # starts; that is a usage error like any other: exit code 2.
        if e.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
