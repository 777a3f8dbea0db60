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


def node_setup_lines(plan, exp) -> list[str]:
    """What an operator's own script does before msrun: the CANN environment (CANN_SET_ENV overrides the planned
    file; skipped where it is absent, as on a CPU machine), as many processes as the system allows (MindSpore
    starts many threads per worker), and a stop at once when the weights are not on this node."""
    q = shlex.quote
    lines = [f"PLANNED_CANN_SET_ENV={q(exp.launch.cann_set_env)}",
             'CANN_SET_ENV="${CANN_SET_ENV:-$PLANNED_CANN_SET_ENV}"',
             'if [ -f "$CANN_SET_ENV" ]; then set +u; source "$CANN_SET_ENV"; set -u; '
             'echo "sourced $CANN_SET_ENV"; fi',
             # (a container may cap it: then as far as its hard limit)
             'ulimit -u unlimited 2>/dev/null || ulimit -u "$(ulimit -Hu)" 2>/dev/null || true']
    ck = exp.phase.load_checkpoint
    lines += [f"PLANNED_LOAD_CHECKPOINT={q(ck)}",
              'CHECKPOINT="${LOAD_CHECKPOINT:-$PLANNED_LOAD_CHECKPOINT}"',
              'if [ -n "$CHECKPOINT" ] && [ -z "${RESUME:-}" ] && [ ! -e "$CHECKPOINT" ]; then echo "error: the weights '
              '$CHECKPOINT are not on this node: copy them here, or start with LOAD_CHECKPOINT=<their path on this '
              'node>" >&2; exit 2; fi']
    return lines


def master_check_lines(plan, exp) -> list[str]:
    """msrun on a plan of several nodes whose planned master is the loopback: without MASTER_ADDR, stop at once
    (msrun would wait cluster_time_out, 2 h, for a master at 127.0.0.1)."""
    if plan.layout.nodes > 1 and exp.launch.master_addr in ("127.0.0.1", "localhost", "::1"):
        return ['if [ -z "${MASTER_ADDR:-}" ]; then echo "error: this plan spans '
                f'{int(plan.layout.nodes)} nodes: start every node\'s script with MASTER_ADDR=<node 0 address> '
                '(or plan with launch.master_addr=<node 0 address>)" >&2; exit 2; fi']
    return []
