"""Slurm: sweeps through Hydra's submitit launcher, and one `sbatch` for a planned multi-node msrun job.

`hydra/launcher=slurm` is Hydra's submitit Slurm launcher with one change: a job that Slurm ends without a
result (cancelled, out of time or memory, its node lost) is recorded as failed in its run dir and the sweep
goes on to its report, where submitit's own launcher would abort the whole sweep with a traceback.

A plan whose launcher is msrun also gets `slurm.sbatch`: one task per node, each running that node's
launch_node<R>.sh with the first node of the allocation as the master address.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

from qwen15_exp.atomic import write_text


class _RecordedFailure:
    """Stands in for a submitit job whose results() raised: the job's result is None, its run dir says why."""

    def __init__(self, job, job_dir: Path):
        self.job, self.job_dir = job, job_dir

    def results(self):
        try:
            return self.job.results()
        except Exception as e:                       # submitit's UncompletedJobError / FailedJobError
            record_failure(self.job_dir, f"Slurm job {self.job.job_id} ended without a result: {first_line(e)}")
            return [None]


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def record_failure(job_dir: Path, error: str) -> None:
    from qwen15_exp.atomic import write_json
    from qwen15_exp.lifecycle import run_status
    previous = run_status(job_dir)
    if previous.get("status") in ("ok", "failed", "invalid", "interrupted"):
        return                                        # the job said how it ended; keep its own words
    write_json(job_dir / "result.json", {**previous, "status": "failed", "run_dir": str(job_dir),
                                         "error": error, "failure_class": "slurm"})


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        import submitit
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        real_map_array = submitit.AutoExecutor.map_array

        def tolerant_map_array(executor, fn, *iterables):
            jobs = real_map_array(executor, fn, *iterables)
            nums = iterables[2]                          # (overrides, dir key, job num, job id, singleton state)
            return [_RecordedFailure(job, sweep_dir / str(num)) for job, num in zip(jobs, nums)]

        submitit.AutoExecutor.map_array = tolerant_map_array
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor.map_array = real_map_array
        return [r if r is not None else _empty_return(o) for r, o in zip(returns, job_overrides)]


def _empty_return(overrides):
    from hydra.core.utils import JobReturn, JobStatus
    return JobReturn(overrides=list(overrides), return_value=None, status=JobStatus.COMPLETED)


def sbatch_script(plan, exp) -> str:
    """One task per node: srun starts launch_node<SLURM_NODEID>.sh on each, with the allocation's first node as
    the master. Values from the config are shell-quoted; the #SBATCH lines hold only checked names and numbers."""
    s, q = exp.launch.slurm, shlex.quote
    lines = ["#!/usr/bin/env bash",
             f"#SBATCH --job-name={_safe(exp.experiment_name)}",
             f"#SBATCH --nodes={int(plan.layout.nodes)}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --time={int(s.time_min)}",
             "#SBATCH --output=slurm-%j.out"]
    if s.partition:
        lines.append(f"#SBATCH --partition={_safe(s.partition)}")
    if s.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={int(s.cpus_per_task)}")
    if s.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += ["# Submit from this folder (shared by every node): sbatch slurm.sbatch",
              "# TRAIN_DATA, LOAD_CHECKPOINT, RESUME and SRC_STRATEGY pass through to every node's script.",
              "set -euo pipefail",
              'cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"',
              'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              f"MASTER_PORT={q(str(exp.launch.master_port))}",
              "export MASTER_ADDR MASTER_PORT",
              # every node's msrun waits for its workers (--join), so srun's exit status is the job's
              "exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec bash \"launch_node${SLURM_NODEID}.sh\"'"]
    return "\n".join(lines) + "\n"


def _safe(value: str) -> str:
    """A value for an #SBATCH line, which no shell reads but sbatch splits at whitespace: keep it one word."""
    word = "".join(c if c.isalnum() or c in "-_.," else "_" for c in str(value))
    return word or "qwen15_exp"


def write_sbatch(plan, exp) -> Path:
    return write_text(Path(plan.run_dir) / "slurm.sbatch", sbatch_script(plan, exp), mode=0o755)
