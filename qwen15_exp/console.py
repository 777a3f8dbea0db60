"""What the terminal shows during a run: our lines and one progress line, not MindFormers' log.

MindFormers logs every step twice at INFO level, to stdout and to output/log/rank_<r>/info.log, and prints
config dumps besides. Its stdout handlers (and Hydra's) keep the sys.stdout they find when they are created,
so the entrypoint first replaces sys.stdout with a stream that is the terminal, except while MindFormers
trains in this process: then it is the run's output/log/console.log. The files keep everything; the
terminal keeps our lines and the progress line (stderr). MindSpore's C++ log shows errors only (GLOG_v=3).
`verbose=true` leaves both as they were.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from qwen15_exp import run_files


# Warnings MindFormers prints on every import here, harmless for Qwen1.5 (they stay in its log files):
# its Qwen3 and DeepSeek-V3 PyNative trainers need the `hyper_parallel` package, which Qwen1.5 does not use.
HARMLESS = ("No module named 'hyper_parallel'",)


class SwitchableStdout:
    """sys.stdout that writes to the terminal, or to a log file while MindFormers runs."""

    def __init__(self, terminal):
        self.terminal = terminal
        self.target = terminal

    def write(self, text: str) -> int:
        if self.target is self.terminal and any(h in text for h in HARMLESS):
            return len(text)
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name):
        return getattr(self.terminal, name)


def verbose_requested(argv: list[str]) -> bool:
    return any(a.lower() in ("verbose=true", "+verbose=true", "verbose=1") for a in argv)


def quiet(argv: list[str]) -> None:
    """Called first by the entrypoint, before MindFormers or Hydra create a log handler."""
    if verbose_requested(argv) or isinstance(sys.stdout, SwitchableStdout):
        return
    os.environ.setdefault("GLOG_v", "3")          # MindSpore C++: errors only on the terminal
    sys.stdout = SwitchableStdout(sys.stdout)


@contextlib.contextmanager
def mindformers_output(run_dir: Path):
    """While MindFormers runs here, what is written to stdout goes to <run_dir>/output/log/console.log."""
    stdout = sys.stdout
    if not isinstance(stdout, SwitchableStdout):
        yield
        return
    log = run_files.console_log(run_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as sink:
        stdout.flush()
        stdout.target = sink
        try:
            yield
        finally:
            stdout.target = stdout.terminal


# What the progress line is called and whether it stays: a sweep's job says which job it is and leaves
# its one summary line instead (set by the entrypoint per job).
PROGRESS = {"label": "train", "leave": True}


class Progress:
    """One live line per run: step / total, loss, tokens/s and ETA (tqdm on stderr)."""

    def __init__(self, total_steps: int | None, tokens_per_step: int, done: int = 0, loss_label: str = "loss"):
        """`done`: steps an earlier segment of a resumed run made (the bar counts as one uninterrupted run);
        `loss_label` says whose loss it is (one rank's under msrun; the summary gives the mean of ranks)."""
        self.loss_label = loss_label
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=done, desc=PROGRESS["label"], unit="step", dynamic_ncols=True,
                        file=sys.stderr, leave=PROGRESS["leave"],
                        bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
        self.tokens_per_step = tokens_per_step

    def step(self, loss: float, step_s: float) -> None:
        rate = self.tokens_per_step / step_s if step_s > 0 else 0.0
        self.bar.set_postfix_str(f"{self.loss_label} {loss:.4f}  {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class StepsFollower:
    """The progress line of steps another process logs (rank 0 under msrun appends steps_rank0.jsonl), read
    where the launcher polls its workers: no log tailing, nothing of MindFormers' output on the terminal."""

    def __init__(self, steps_log: Path, progress: Progress):
        # a resumed run's log already holds the earlier segments' steps: follow from its end
        self.steps_log, self.progress = Path(steps_log), progress
        self.offset = self.steps_log.stat().st_size if self.steps_log.is_file() else 0

    def poll(self) -> None:
        import json
        if not self.steps_log.is_file():
            return
        with open(self.steps_log, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]           # a line being written waits for the next poll
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            record = json.loads(line)
            self.progress.step(record["loss"], record["step_s"])

    def close(self) -> None:
        """The last steps written, then the line closed."""
        self.poll()
        self.progress.close()
