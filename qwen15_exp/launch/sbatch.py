"""slurm.sbatch: a planned msrun job (one or many nodes) one `sbatch` away on a Slurm cluster.

One task per node: srun starts launch_node<SLURM_NODEID>.sh on each, with the first node of the allocation as
the master address; every node's msrun waits for its workers (--join), so srun's exit status is the job's.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from qwen15_exp.atomic import write_text


def sbatch_script(plan, exp) -> str:
    """Values from the config are shell-quoted; the #SBATCH lines hold only numbers and one-word names."""
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
              "exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec bash \"launch_node${SLURM_NODEID}.sh\"'"]
    return "\n".join(lines) + "\n"


def _safe(value: str) -> str:
    """A value for an #SBATCH line, which no shell reads but sbatch splits at whitespace: keep it one word."""
    word = "".join(c if c.isalnum() or c in "-_.," else "_" for c in str(value))
    return word or "qwen15_exp"


def write_sbatch(plan, exp) -> Path:
    return write_text(Path(plan.run_dir) / "slurm.sbatch", sbatch_script(plan, exp), mode=0o755)
