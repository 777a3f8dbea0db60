"""One qwen15_exp job in a fresh process, as the benchmarks run it; its result.json back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_job(work: Path, name: str, env: dict, steps: int, overrides: list[str]) -> dict:
    run_dir = work / name
    cmd = [sys.executable, "-m", "qwen15_exp", f"phase.max_steps={steps}", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "result.json").read_text())
