"""Launch through MindSpore's msrun: one command per node, written as scripts, run here when possible.

Every run dir that uses msrun holds launch_node<R>.sh for each node R (cd into the run dir, export the
environment the recipe needs, start msrun with worker_num, local_worker_num, master_addr, master_port,
node_rank, log_dir, join and cluster_time_out). Every value that enters a script is shell-quoted. On this
machine's CPU the single-node script is executed for real (data parallel workers).
"""
from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from qwen15_exp.atomic import write_text
from qwen15_exp.launch.worker import WORKER_STUB
from qwen15_exp.validate import ENV_KEY


def msrun_args(plan, exp, node_rank: int, master_addr: str, master_port: int) -> list[str]:
    per_node = plan.layout.devices_here
    return ["msrun", f"--worker_num={plan.layout.devices}", f"--local_worker_num={per_node}",
            f"--master_addr={master_addr}", f"--master_port={master_port}", f"--node_rank={node_rank}",
            "--log_dir=msrun_log", f"--join={exp.launch.join or plan.layout.nodes == 1}",
            f"--cluster_time_out={exp.launch.cluster_time_out}",
            "worker.py", "--config", "mindformers.yaml"]


def node_script(plan, exp, node_rank: int) -> str:
    """The launch script of one node. Only numbers we computed stand in comments; every other value is a
    shell-quoted assignment, so no name, path or environment value can end a line or run a command."""
    q, L = shlex.quote, exp.launch
    lines = [
        "#!/usr/bin/env bash",
        f"# node {int(node_rank)} of {int(plan.layout.nodes)}: {int(plan.layout.devices)} devices, "
        f"{int(plan.layout.devices_here)} on this node. What runs is named in the QWEN15_EXP_* variables below.",
        "# Run on that node from this folder (the same path on every node, or shared storage).",
        "# MASTER_ADDR / MASTER_PORT override the planned master; TRAIN_DATA the dataset folder; "
        "LOAD_CHECKPOINT the weights.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
    names = {"QWEN15_EXP_EXPERIMENT": exp.experiment_name, "QWEN15_EXP_MODEL": exp.model.name,
             "QWEN15_EXP_PHASE": exp.phase.name, "QWEN15_EXP_LAYOUT": plan.layout.name,
             "QWEN15_EXP_HARDWARE": exp.hardware.name}
    for k, v in {**names, **dict(sorted(plan.env.items()))}.items():
        if not ENV_KEY.fullmatch(k):          # validate() rejects these first; never write one unquoted
            raise ValueError(f"not an environment variable name: {k!r}")
        lines.append(f"export {k}={q(str(v))}")
    lines += [f"PLANNED_MASTER_ADDR={q(L.master_addr)}", f"PLANNED_MASTER_PORT={q(str(L.master_port))}",
              'MASTER_ADDR="${MASTER_ADDR:-$PLANNED_MASTER_ADDR}"',
              'MASTER_PORT="${MASTER_PORT:-$PLANNED_MASTER_PORT}"']
    args = msrun_args(plan, exp, node_rank, "MASTER_ADDR_PLACEHOLDER", 0)
    quoted = " ".join(q(a) for a in args)
    quoted = quoted.replace(q("--master_addr=MASTER_ADDR_PLACEHOLDER"), '--master_addr="$MASTER_ADDR"')
    quoted = quoted.replace(q("--master_port=0"), '--master_port="$MASTER_PORT"')
    lines.append(f'exec {quoted} ${{TRAIN_DATA:+--train_dataset_dir "$TRAIN_DATA"}} '
                 '${LOAD_CHECKPOINT:+--load_checkpoint "$LOAD_CHECKPOINT"}')
    return "\n".join(lines) + "\n"


def write_launch_files(plan, exp) -> list[Path]:
    run_dir = Path(plan.run_dir)
    write_text(run_dir / "worker.py", WORKER_STUB)
    scripts = [write_text(run_dir / f"launch_node{r}.sh", node_script(plan, exp, r), mode=0o755)
               for r in range(plan.layout.nodes)]
    return scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gather_ranks(run_dir: Path, plan, process_t0: float) -> dict:
    from qwen15_exp.result import measured_figures
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank_*.json"))]
    if len(ranks) != plan.layout.devices:
        raise RuntimeError(f"expected {plan.layout.devices} rank results in {run_dir}, found {len(ranks)}; "
                           f"see {run_dir / 'msrun_log'}")
    steps = min(len(r["step_times_s"]) for r in ranks)
    slowest = [max(r["step_times_s"][i] for r in ranks) for i in range(steps)]   # a step ends on every rank
    mean_loss = [sum(r["losses"][i] for r in ranks) / len(ranks) for i in range(steps)]
    firsts = [r["first_step_unix"] for r in ranks if r["first_step_unix"]]
    figures = measured_figures(losses=mean_loss, step_times=slowest, tokens_per_step=plan.layout.tokens_per_step,
                               devices=plan.layout.devices, first_step_s=(max(firsts) - process_t0) if firsts else None,
                               train_call_s=0.0, peak_rss_mb=0.0)
    figures["ranks"] = [{"rank": r["rank"], "loss": r["losses"], "step_times_s": r["step_times_s"]} for r in ranks]
    return figures


def run_msrun(plan, exp, yaml_path: Path, process_t0: float) -> dict:
    """Run the single-node plan here (CPU workers, or NPUs when present)."""
    write_launch_files(plan, exp)
    run_dir = Path(plan.run_dir)
    node = exp.launch.node_rank or 0
    if plan.layout.nodes > 1 and exp.launch.node_rank is None:
        from qwen15_exp.errors import UserError
        raise UserError(f"this plan spans {plan.layout.nodes} nodes: run the same command on every node with "
                        f"launch.node_rank=<0..{plan.layout.nodes - 1}> launch.master_addr=<node 0 address>, "
                        f"or start launch_node<R>.sh from {run_dir} on each node")
    from qwen15_exp.launch.local import mindformers_env
    bin_dir = str(Path(sys.executable).parent)
    import os
    env = {**os.environ, **mindformers_env(run_dir), **plan.env,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),   # msrun starts workers as plain `python`
           "MASTER_PORT": str(free_port() if plan.layout.nodes == 1 else exp.launch.master_port),
           "MASTER_ADDR": "127.0.0.1" if plan.layout.nodes == 1 else exp.launch.master_addr}
    t_call = time.perf_counter()
    proc = subprocess.run(["bash", str(run_dir / f"launch_node{node}.sh")], cwd=run_dir, env=env)
    if proc.returncode != 0:
        logs = sorted((run_dir / "msrun_log").glob("*.log"))
        tail = logs[-1].read_text(errors="replace")[-2000:] if logs else ""
        raise RuntimeError(f"msrun exited with {proc.returncode}; logs in {run_dir / 'msrun_log'}\n{tail}")
    if plan.layout.nodes > 1:          # the other nodes' ranks write into their own copies of the run dir
        return {"node_rank": node, "ranks_here": sorted(p.name for p in run_dir.glob("rank_*.json"))}
    if exp.phase.run_mode == "predict":
        ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank_*.json"))]
        return {"ranks": ranks, "generated_texts": ranks[0]["generated"] if ranks else []}
    figures = gather_ranks(run_dir, plan, process_t0)
    figures["train_call_s"] = round(time.perf_counter() - t_call, 3)
    return figures
