"""The shared shape of every entrypoint: a Hydra app over conf/, user errors as exit code 2, no traceback.

Hydra reports a bad override or an unknown group option itself and exits with 1 before the task starts;
that is a usage error like any other, so it becomes 2 as well. Errors inside a task that are not the user's
keep their traceback and exit code 1.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from omegaconf.errors import MissingMandatoryValue

from qwen15_exp.errors import UserError
from qwen15_exp.lifecycle import RunInterrupted


def report_user_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def exit_code_of(e: BaseException) -> int:
    return getattr(e, "exit_code", 2)


def user_error_message(e: BaseException) -> str | None:
    if isinstance(e, MissingMandatoryValue):
        return f"{e.full_key} is required and has no value; set it on the command line ({e.full_key}=...)"
    if isinstance(e, UserError):
        return str(e)
    return None


def slurm_missing(argv: list[str]) -> str | None:
    """hydra/launcher=submitit_slurm where Slurm's commands are missing: submitit would end in a long
    traceback ("Could not detect srun") after composing every job."""
    import shutil
    if not any(a.startswith("hydra/launcher=") and "slurm" in a for a in argv):
        return None
    missing = [tool for tool in ("sbatch", "sacct", "srun") if shutil.which(tool) is None]
    if not missing:
        return None
    return (f"{next(a for a in argv if a.startswith('hydra/launcher='))} sends every job to a Slurm cluster, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH here; run it on a Slurm login "
            "node, or leave out the launcher override to run the sweep on this machine")


MAX_CHOICE_CHARS = 200


def absurd_choice(argv: list[str]) -> str | None:
    """A config group choice no file can be named (`model=<5,000 characters>`): Hydra would look the file up
    and end in "File name too long"."""
    from qwen15_exp.compose import conf_dir, group_options
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq and "." not in key and (conf_dir() / key).is_dir() and (len(value) > MAX_CHOICE_CHARS
                                                                       or "\0" in value):
            return (f"{key}=<{len(value):,} characters>: not an option of {key}; choose one of "
                    f"{', '.join(group_options(key))}")
    return None


def exit_on_user_error(fn: Callable[[], Any], hint: str = "") -> Any:
    """fn(), with a user's mistake (ours, Hydra's or OmegaConf's) reported in one line and exit code 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        return fn()
    except (UserError, MissingMandatoryValue) as e:
        report_user_error(user_error_message(e))
        sys.exit(exit_code_of(e))
    except (HydraException, OmegaConfBaseException) as e:
        report_user_error(f"{e}".strip().splitlines()[0] + (f"\n  ({hint})" if hint else ""))
        sys.exit(2)


def run_app(config_name: str, task: Callable[[Any], Any],
            prepare_argv: Callable[[list[str]], list[str]] | None = None) -> None:
    """The Hydra app over conf/<config_name>.yaml running `task`. `prepare_argv` may rewrite the command line
    first (resume=<run dir>) or refuse it (a UserError: exit 2)."""
    import hydra

    from qwen15_exp.console import quiet
    from qwen15_exp.launch.start import prepare_process
    quiet(sys.argv[1:])                   # every entrypoint (chat, prepare, convert): MindFormers' log to its files
    prepare_process()

    problem = slurm_missing(sys.argv[1:]) or absurd_choice(sys.argv[1:])
    if problem:
        report_user_error(problem)
        sys.exit(2)

    from qwen15_exp.compose import conf_dir, register

    register()
    if prepare_argv is not None:
        sys.argv[1:] = exit_on_user_error(lambda: prepare_argv(sys.argv[1:]))
    started = []

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def app(cfg):
        started.append(True)
        try:
            return task(cfg)
        except (UserError, MissingMandatoryValue) as e:
            report_user_error(user_error_message(e))
            sys.exit(exit_code_of(e))
        except RunInterrupted as e:           # a signal: result.json says interrupted; stop (a sweep too)
            report_user_error(str(e))
            sys.exit(e.exit_code)

    try:
        app()
    except SystemExit as e:
        if e.code == 1 and not started:
            sys.exit(2)
        raise
