"""`hydra/launcher=slurm`: Hydra's submitit Slurm launcher with one change: a job that Slurm ends without a
result (cancelled, out of time or memory, its node lost) is recorded as failed in its run dir and the sweep
goes on to its report, where submitit's own launcher would abort the whole sweep with a traceback.

submitit learns that a job ended without a result from `sacct`, so that needs Slurm's accounting.
"""
from __future__ import annotations

from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

from qwen15_exp.lifecycle import first_line, run_status


class _RecordedFailure:
    """Stands in for a submitit job whose results() raised: the job's result is None, its run dir says why."""

    def __init__(self, job, job_dir: Path):
        self.job, self.job_dir = job, job_dir

    def results(self):
        try:
            return self.job.results()
        except Exception as e:                       # submitit's UncompletedJobError / FailedJobError
            record_failure(self.job_dir, f"Slurm job {self.job.job_id} ended without a result: "
                                         f"{first_line(str(e)) or type(e).__name__}")
            return [None]


def record_failure(job_dir: Path, error: str) -> None:
    from qwen15_exp.atomic import write_json
    previous = run_status(job_dir)
    if previous.get("status") not in ("running", "killed", "missing"):
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

        # submitit's launcher reads every job's results() in one list comprehension; the jobs it gets back from
        # map_array are wrapped so that one job's failure is recorded instead of raised
        submitit.AutoExecutor.map_array = tolerant_map_array
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor.map_array = real_map_array
        return [r if r is not None else _empty_return(o) for r, o in zip(returns, job_overrides)]


def _empty_return(overrides):
    from hydra.core.utils import JobReturn, JobStatus
    return JobReturn(overrides=list(overrides), return_value=None, status=JobStatus.COMPLETED)
