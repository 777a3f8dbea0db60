"""What every node script shares (msrun's and the rank table's): the quoted environment and the worker's options.

Only numbers we computed stand unquoted; every name, path and environment value is a shell-quoted assignment,
so none can end a line or run a command.
"""
from __future__ import annotations

import re
import shlex

ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")      # a name a shell takes after `export`; validate() checks it

# the worker's options a node script takes from the environment it is started with
WORKER_OPTIONS = ('${TRAIN_DATA:+--train_dataset_dir "$TRAIN_DATA"} '
                  '${LOAD_CHECKPOINT:+--load_checkpoint "$LOAD_CHECKPOINT"} ${RESUME:+--resume "$RESUME"} '
                  '${SRC_STRATEGY:+--src_strategy "$SRC_STRATEGY"}')


def export_lines(plan, exp, **names: str) -> list[str]:
    """`export` lines: what runs (QWEN15_EXP_*, plus `names`) and the plan's environment."""
    named = {"QWEN15_EXP_EXPERIMENT": exp.experiment_name, "QWEN15_EXP_MODEL": exp.model.name,
             "QWEN15_EXP_PHASE": exp.phase.name, "QWEN15_EXP_LAYOUT": plan.layout.name,
             "QWEN15_EXP_HARDWARE": exp.hardware.name, **names}
    lines = []
    for k, v in {**named, **dict(sorted(plan.env.items()))}.items():
        if not ENV_KEY.fullmatch(k):          # validate() rejects these first; never write one unquoted
            raise ValueError(f"not an environment variable name: {k!r}")
        lines.append(f"export {k}={shlex.quote(str(v))}")
    return lines
