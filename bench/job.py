"""One qwen15_exp job in a fresh process, as the benchmarks run it; its result.json back."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def scratch(prefix: str):
    """A benchmark's work folder, removed when it ends however it ends: its runs write checkpoints of hundreds of MB
    each, and a disk filled by old benchmarks fails the next test run. QWEN15_BENCH_KEEP=1 keeps it to look into."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if os.environ.get("QWEN15_BENCH_KEEP") == "1":
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_job(work: Path, name: str, env: dict, steps: int, overrides: list[str]) -> dict:
    run_dir = work / name
    cmd = [sys.executable, "-m", "qwen15_exp", f"phase.max_steps={steps}", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "result.json").read_text())
