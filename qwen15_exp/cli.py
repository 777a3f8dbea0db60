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
        return slurm_not_answering()
    return (f"{next(a for a in argv if a.startswith('hydra/launcher='))} sends every job to a Slurm cluster, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH here; run it on a Slurm login "
            "node, or leave out the launcher override to run the sweep on this machine")


MAX_CHOICE_CHARS = 200


def unwritable_roots() -> str | None:
    """The output root (every run writes there) and the cache root (data, weights, compiled graphs) must take
    files; QWEN15_EXP_OUTPUTS and XDG_CACHE_HOME move them."""
    from qwen15_exp.paths import cache_root, output_root, unwritable
    for root, key in ((output_root(), "QWEN15_EXP_OUTPUTS"), (cache_root(), "XDG_CACHE_HOME")):
        why = unwritable(root)
        if why:
            return f"cannot write into {root} ({why}); point {key} at a writable folder"
    return None


WRITE_ERRORS = {30: "read-only file system", 13: "permission denied", 28: "no space left", 122: "disk quota exceeded"}


def write_error_message(e: OSError) -> str | None:
    """An OSError of the machine's storage as one line for the user, or None for any other error."""
    if e.errno not in WRITE_ERRORS:
        return None
    where = e.filename or "a file"
    return (f"cannot write {where}: {e.strerror or WRITE_ERRORS[e.errno]}; give a writable folder with free space "
            "(output=, QWEN15_EXP_OUTPUTS, XDG_CACHE_HOME)")


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


def slurm_not_answering() -> str | None:
    """Slurm's commands are here but its controller does not answer (submitit would end in a
    CalledProcessError traceback): Slurm's own reason, in a line."""
    import subprocess
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the Slurm controller does not answer (scontrol ping: {e}); run the sweep where Slurm works"
    if r.returncode == 0 and "UP" in r.stdout:
        return None
    reason = next((line for line in (r.stderr + r.stdout).splitlines() if line.strip()), "no answer")
    return (f"hydra/launcher=slurm: the Slurm controller does not answer (scontrol ping: {reason.strip()}); start "
            "slurmctld or run on a cluster's login node, or leave out the launcher override")


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

    problem = slurm_missing(sys.argv[1:]) or absurd_choice(sys.argv[1:]) or unwritable_roots()
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
        except OSError as e:                  # a read-only or full file system: the machine's, said in a line
            message = write_error_message(e)
            if message is None:
                raise
            report_user_error(message)
            sys.exit(2)

    try:
        app()
    except SystemExit as e:
        if e.code == 1 and not started:
            sys.exit(2)
        raise
