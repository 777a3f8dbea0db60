"""The life of a run: planned -> running -> ok | failed | interrupted | invalid, and killed as readers see it.

A run writes result.json with status `running` (and its pid) when it starts to execute, and the final status
when it ends, for whatever reason. SIGINT and SIGTERM become a graceful stop (`StopRequest`): training ends at
the next step boundary with a checkpoint, and the run is `interrupted`. A second signal stops at once. SIGKILL
cannot be caught: a run dir whose result still says `running` for a process that is gone, or that has a
plan and no result, was `killed`, and every reader (`run_status`) says so.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from qwen15_exp import run_files

INITIAL_STEP_ENV = "QWEN15_EXP_INITIAL_STEP"   # steps done before this process (a resumed run's plan sets it)
STOP_FILE = "STOP"           # in the run dir: the step at which every rank stops (mindformers_ext.StopControl)


class RunInterrupted(Exception):
    """The run was stopped by a signal (after a graceful stop, or at once for a second signal or one that
    came before training started). The process exits with 128 + the signal number, as a shell reports it."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopRequest:
    """Set by SIGINT/SIGTERM while a run executes; read by the training callback and the launchers."""

    def __init__(self):
        self.signal: int | None = None
        self.count = 0
        self.training = False          # once training runs, the first signal waits for a step boundary

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum, frame) -> None:
        self.signal, self.count = signum, self.count + 1
        if self.count > 1 or not self.training:
            raise RunInterrupted(f"stopped by {signal.Signals(signum).name}", signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


@contextlib.contextmanager
def stop_on_signals(request: StopRequest):
    """Route SIGINT and SIGTERM to `request` for the duration of the block (main thread only)."""
    old = {s: signal.signal(s, request.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def set_parent_death_signal(sig: int) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): this process gets `sig` when the process that started it dies."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))
    except OSError:
        pass                              # not Linux: the explicit stop paths still apply


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: Path) -> dict:
    """The run's result as anything reading it should see it (status `killed` where the process died)."""
    run_dir = Path(run_dir)
    result_path = run_dir / run_files.RESULT
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except (ValueError, UnicodeDecodeError):
            return {"status": "unreadable", "run_dir": str(run_dir),
                    "error": f"{result_path} is not readable JSON (cut short or edited): how the run ended is not "
                             f"known; resume={run_dir} continues from its newest complete checkpoint"}
        if result.get("status") == "running" and not pid_alive(int(result.get("pid", 0) or 0)):
            return {**result, "status": "killed",
                    "error": "the process was killed (SIGKILL, out of memory, or the node went away); "
                             f"continue it with: python -m qwen15_exp resume={run_dir}"}
        if result:
            return result
    if (run_dir / run_files.PLAN).is_file():
        return {"status": "killed", "run_dir": str(run_dir),
                "error": "the run has a plan but no result: it was killed before it could write one"}
    return {"status": "missing", "run_dir": str(run_dir)}


def read_steps(log: Path) -> list[dict]:
    """A steps log (JSON lines), last record per step, in step order; a torn last line is ignored."""
    records = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            records[int(r["step"])] = r
    return [records[k] for k in sorted(records)]


FAILURE_CLASSES = (      # (class, words in the error or the worker log that identify it), first match wins
    ("disk full", ("no space left", "disk quota exceeded")),
    ("out of memory", ("out of memory", "outofmemory", "memoryerror", "cannot allocate memory", "oom", "malloc")),
    ("killed", ("killed", "sigkill", "signal 9")),
    ("connection / HCCL", ("hccl", "connection refused", "timed out", "timeout", "address already in use",
                           "cluster", "scheduler", "rendezvous")),
    ("compile error", ("compile", "kernel select failed", "unsupported op", "graph", "infer failed")),
    ("data", ("dataset", "mindrecord", "data file", "tokenizer", "columns")),
    ("configuration", ("class registry", "not registered", "unexpected keyword", "missing 1 required",
                       "invalid value", "not supported")),
)


def classify_failure(*texts: str) -> str:
    """A failure's class from its message and log: out of memory, killed, connection / HCCL, compile error,
    data, configuration, or other."""
    blob = " ".join(t for t in texts if t).lower()
    for name, needles in FAILURE_CLASSES:
        if any(n in blob for n in needles):
            return name
    return "other"


def first_line(text: str) -> str:
    """The line that says what went wrong (for a list of problems, the first problem, not the heading)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith("nothing was run:"):
        return lines[1]
    return lines[0] if lines else ""
