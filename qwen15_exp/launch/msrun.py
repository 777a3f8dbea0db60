"""Launch through MindSpore's msrun: one command per node, written as scripts, run here when possible.

Every run dir that uses msrun holds launch_node<R>.sh for each node R (cd into the run dir, export the
environment the recipe needs, start msrun with worker_num, local_worker_num, master_addr, master_port,
node_rank, log_dir, join and cluster_time_out). Every value that enters a script is shell-quoted. On this
machine's CPU the single-node script is executed for real (data parallel workers), supervised: msrun runs in a
session of its own and dies with this process; a stop request gives the workers SIGTERM (they agree on a step
and checkpoint), then, after launch.stop_grace_s or a second request, the whole tree is stopped.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from qwen15_exp import run_files
from qwen15_exp.atomic import write_text
from qwen15_exp.launch.worker import WORKER_STUB
from qwen15_exp.lifecycle import set_parent_death_signal
from qwen15_exp.launch.script import WORKER_OPTIONS, export_lines, master_check_lines, node_setup_lines


NODE_LOG_PREFIX = "msrun_log/node"


def node_log_dir(node_rank: int) -> str:
    """Each node's msrun logs in a folder of its own, so nodes that share storage do not overwrite them."""
    return f"{NODE_LOG_PREFIX}{int(node_rank)}"


def msrun_args(plan, exp, node_rank: int, master_addr: str, master_port: int) -> list[str]:
    """With --join=True (launch.join, the default) msrun waits for this node's workers and exits non-zero when
    one fails, so a wrapper (Slurm, a shell) sees the outcome; the console follows the node's first worker."""
    per_node = plan.layout.devices_here
    join = exp.launch.join or (plan.executes and plan.layout.nodes == 1)   # we supervise what we run here
    return ["msrun", f"--worker_num={plan.layout.devices}", f"--local_worker_num={per_node}",
            f"--master_addr={master_addr}", f"--master_port={master_port}", f"--node_rank={node_rank}",
            f"--log_dir={node_log_dir(node_rank)}", f"--join={join}",
            f"--tail_worker_log={node_rank * per_node}", f"--cluster_time_out={exp.launch.cluster_time_out}",
            *(["--bind_core=True"] if exp.launch.bind_core and exp.hardware.device_target == "Ascend" else []),
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
        "# To continue a stopped run: RESUME=<its output/checkpoint folder>; if it was saved with another layout, "
        "also SRC_STRATEGY=<its output/strategy folder> (MindFormers re-shards it: auto_trans_ckpt).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
    lines += export_lines(plan, exp, QWEN15_EXP_NODE_RANK=str(int(node_rank)))
    lines += master_check_lines(plan, exp) + node_setup_lines(plan, exp)
    lines += [f"PLANNED_MASTER_ADDR={q(L.master_addr)}", f"PLANNED_MASTER_PORT={q(str(L.master_port))}",
              'MASTER_ADDR="${MASTER_ADDR:-$PLANNED_MASTER_ADDR}"',
              'MASTER_PORT="${MASTER_PORT:-$PLANNED_MASTER_PORT}"']
    args = msrun_args(plan, exp, node_rank, "MASTER_ADDR_PLACEHOLDER", 0)
    quoted = " ".join(q(a) for a in args)
    quoted = quoted.replace(q("--master_addr=MASTER_ADDR_PLACEHOLDER"), '--master_addr="$MASTER_ADDR"')
    quoted = quoted.replace(q("--master_port=0"), '--master_port="$MASTER_PORT"')
    command = f"{quoted} {WORKER_OPTIONS}"
    lines += [f'echo "node {int(node_rank)}: msrun, master $MASTER_ADDR:$MASTER_PORT, logs in '
              f'$PWD/{node_log_dir(node_rank)}"',
              # qwen15_exp supervises what it runs here itself (it stops the tree and writes result.json)
              f'if [ -n "${{QWEN15_EXP_SUPERVISED:-}}" ]; then exec {command}; fi',
              'START_UNIX="$(date +%s.%N)"',
              f'LOG_DIR={q(node_log_dir(node_rank))}; mkdir -p "$LOG_DIR"',
              # msrun's own output (every worker's MindFormers INFO) to a file; QWEN15_EXP_VERBOSE=1 shows it
              'if [ "${QWEN15_EXP_VERBOSE:-0}" = 1 ]; then OUT=/dev/stdout; else OUT="$LOG_DIR/msrun_console.log"; '
              'echo "msrun output: $PWD/$OUT"; fi',
              'set -x', f'{command} > "$OUT" 2>&1 &', "{ set +x; } 2>/dev/null", "pid=$!"]
    if plan.steps and exp.phase.trains:
        first = node_rank * plan.layout.devices_here
        label = f"rank {first} loss" if plan.layout.devices > 1 else "loss"
        lines += ['if [ "$OUT" != /dev/stdout ]; then "${PYTHON:-python}" -m qwen15_exp.follow '
                  f'{q(run_files.steps_log(".", first).name)} --total {int(plan.steps)} --tokens-per-step '
                  f'{int(plan.layout.tokens_per_step)} --label {q(label)} --pid "$pid" & fi']
    lines += [# Slurm and a terminal signal this shell: msrun's own SIGINT handler stops its workers
              "trap 'kill -INT \"$pid\" 2>/dev/null' INT TERM",
              'status=0; wait "$pid" || status=$?',
              'while kill -0 "$pid" 2>/dev/null; do wait "$pid" || status=$?; done',
              'wait 2>/dev/null || true',                                 # the progress line's last update
              'if [ "$status" -ne 0 ] && [ "$OUT" != /dev/stdout ]; then echo "msrun exited with $status; the end '
              'of its output ($PWD/$OUT):" >&2; tail -n 40 "$OUT" >&2; fi']
    if node_rank == 0:
        # node 0 turns the plan's result.json into the run's: every rank whose logs it sees (all of them on shared
        # storage), the status from msrun's exit
        lines.append('"${PYTHON:-python}" -m qwen15_exp.collect . --exit-code "$status" --started "$START_UNIX" '
                     '|| echo "warning: the ranks were not collected into result.json (see above)" >&2')
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"


def write_launch_files(plan, exp) -> list[Path]:
    """worker.py and launch_node<R>.sh per node: msrun, or a worker per device of launch.rank_table."""
    run_dir = Path(plan.run_dir)
    write_text(run_dir / run_files.WORKER, WORKER_STUB)
    if exp.launch.rank_table:
        from qwen15_exp.launch.rank_table import node_script as rank_table_script, read_rank_table
        servers = read_rank_table(exp.launch.rank_table)
        return [write_text(run_dir / f"launch_node{r}.sh", rank_table_script(plan, exp, r, servers), mode=0o755)
                for r in range(len(servers))]
    from qwen15_exp.launch.sbatch import write_sbatch
    scripts = [write_text(run_dir / f"launch_node{r}.sh", node_script(plan, exp, r), mode=0o755)
               for r in range(plan.layout.nodes)]
    write_sbatch(plan, exp)                       # the same scripts, one `sbatch` away on a Slurm cluster
    return scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchFailed(RuntimeError):
    """msrun or a worker failed; the message ends with the tail of the worker log that says why."""


def descendants(pid: int) -> list:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def is_worker(process) -> bool:
    """A training process msrun started: not msrun, its scheduler (the same script) or its log tails (which
    inherit MS_ROLE)."""
    import psutil
    try:
        return process.environ().get("MS_ROLE") == "MS_WORKER" and "worker.py" in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_tree(proc: subprocess.Popen, known: list) -> None:
    """Stop msrun and everything it started: msrun's own SIGINT handler first (it kills its workers, their
    log tails and the scheduler), then SIGKILL for whatever is left (workers run in sessions of their own)."""
    import psutil
    everyone = {p.pid: p for p in known + descendants(proc.pid)}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    for p in everyone.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(everyone.values()), timeout=10)
    proc.wait(timeout=10)


def worker_log_tail(run_dir: Path, chars: int = 2000) -> str:
    logs = sorted((run_dir / "msrun_log").rglob("worker_*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text(errors="replace")[-chars:] if logs else ""


def running(process) -> bool:
    import psutil
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


WORKERS_GONE_S = 2.0      # after a stop request, msrun alone this long (its scheduler waits for workers): stop it


def supervise(proc: subprocess.Popen, request, grace_s: float, run_dir: Path, on_poll=lambda: None) -> int:
    """Wait for msrun. On a stop request, the workers get SIGTERM (they agree on a step, checkpoint and exit),
    and so do workers msrun starts after it (a stop during start-up). Once no worker is left, msrun is stopped
    too instead of waiting for its scheduler's timeout; after `grace_s`, or on a second request, everything is
    stopped at once. Returns msrun's exit code."""
    from qwen15_exp.lifecycle import RunInterrupted
    forwarded_at, seen, terminated, last_worker_at = None, [], set(), None
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            on_poll()
            seen = list({p.pid: p for p in seen + descendants(proc.pid)}.values())
            if not request():
                continue
            now = time.monotonic()
            forwarded_at = forwarded_at or now
            workers = [p for p in seen if is_worker(p) and running(p)]
            for p in workers:
                if p.pid not in terminated:
                    p.terminate()
                    terminated.add(p.pid)
            if workers:
                last_worker_at = now
            if now - (last_worker_at or forwarded_at) > WORKERS_GONE_S:
                stop_tree(proc, seen)
                return proc.returncode
            if now - forwarded_at > grace_s:
                raise RunInterrupted(f"workers did not stop within launch.stop_grace_s={grace_s:g}s", request.signal)
    except BaseException:
        stop_tree(proc, seen)
        raise
    finally:
        if proc.poll() is None:
            stop_tree(proc, seen)


def run_msrun(plan, exp, kind: str, request):
    """Run this node's share of the plan here (CPU workers, or NPUs when present)."""
    from qwen15_exp.launch.launched import Launched
    write_launch_files(plan, exp)
    run_dir = Path(plan.run_dir)
    node = exp.launch.node_rank or 0
    if plan.layout.nodes > 1 and exp.launch.node_rank is None:
        from qwen15_exp.errors import UserError
        raise UserError(f"this plan spans {plan.layout.nodes} nodes: run the same command on every node with "
                        f"launch.node_rank=<0..{plan.layout.nodes - 1}> launch.master_addr=<node 0 address>, "
                        f"or start launch_node<R>.sh from {run_dir} on each node")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **run_files.mindformers_env(run_dir), **plan.env,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),   # msrun starts workers as plain `python`
           "MASTER_PORT": str(free_port() if plan.layout.nodes == 1 else exp.launch.master_port),
           "MASTER_ADDR": "127.0.0.1" if plan.layout.nodes == 1 else exp.launch.master_addr,
           "QWEN15_EXP_PARENT_DEATH": "1",       # workers die with msrun (worker.py)
           "QWEN15_EXP_SUPERVISED": "1"}         # the node script execs msrun; this process writes result.json
    t_call = time.perf_counter()
    # msrun's own output (and the worker log it tails) goes to the run's console.log; the terminal shows the
    # progress of this node's first rank from its steps log (verbose=true: msrun's output as it is)
    console = None
    if not exp.verbose:
        console_log = run_files.console_log(run_dir)
        console_log.parent.mkdir(parents=True, exist_ok=True)
        console = open(console_log, "a", encoding="utf-8")
    follower = None
    if kind == "train" and not exp.verbose:
        from qwen15_exp.console import Progress, StepsFollower
        follower = StepsFollower(run_files.steps_log(run_dir, node * plan.layout.devices_here),
                                 Progress(plan.steps, plan.layout.tokens_per_step, plan.steps_done,
                                          loss_label=f"rank {node * plan.layout.devices_here} loss"
                                          if plan.layout.devices > 1 else "loss"))
    # msrun in a session of its own (a terminal's Ctrl-C reaches only us; we decide), told to stop (SIGINT,
    # which its handler turns into killing every worker) if this process dies, even by SIGKILL
    try:
        proc = subprocess.Popen(["bash", str(run_dir / f"launch_node{node}.sh")], cwd=run_dir, env=env,
                                stdout=console, stderr=subprocess.STDOUT if console else None,
                                start_new_session=True, preexec_fn=lambda: set_parent_death_signal(signal.SIGINT))
        request.training = True
        code = supervise(proc, request, exp.launch.stop_grace_s, run_dir,
                         on_poll=follower.poll if follower else lambda: None)
    finally:
        if follower:
            follower.close()
        if console:
            console.close()
    if code != 0 and not request():
        raise LaunchFailed(f"msrun exited with {code}; logs in {run_dir / 'msrun_log'}\n{worker_log_tail(run_dir)}")
    call_s = time.perf_counter() - t_call
    if plan.layout.nodes > 1:          # the other nodes' ranks write into their own copies of the run dir
        return Launched("msrun", kind, call_s=call_s, node_rank=node,
                        ranks_here=sorted(p.name for p in run_dir.glob(run_files.RANK_RECORD_GLOB)))
    ranks = run_files.rank_records(run_dir)
    peak = max((r.get("peak_rss_mb", 0.0) for r in ranks), default=0.0)
    if kind == "predict":
        return Launched("msrun", kind, call_s=call_s, peak_rss_mb=peak, **predict_record(exp, ranks))
    if kind == "benchmark":
        from qwen15_exp.launch.local import benchmark_figures
        [summary] = [r["benchmark"] for r in ranks if r.get("benchmark")]
        return Launched("msrun", kind, call_s=call_s, peak_rss_mb=peak, benchmark=summary,
                        figures=benchmark_figures(summary, exp.phase.load_checkpoint, peak))
    if kind == "eval":
        from qwen15_exp.launch.local import final_eval
        return Launched("msrun", kind, call_s=call_s, peak_rss_mb=peak,
                        figures={**final_eval(run_dir), "seconds": round(call_s, 3)})
    if kind == "export":
        files = [f for r in ranks for f in r.get("mindir", [])]
        return Launched("msrun", kind, call_s=call_s, figures={"mindir": files, "check": None,
                                                               "weights": exp.phase.load_checkpoint})
    firsts = [r["first_step_unix"] for r in ranks if r.get("first_step_unix")]
    return Launched("msrun", kind, call_s=call_s, peak_rss_mb=peak, first_step_unix=max(firsts) if firsts else None)


def predict_record(exp, ranks: list[dict]) -> dict:
    """Rank 0's generations in the shape the in-process predict reports: one record per prompt, the tokens and
    tokens/s. Data-parallel ranks generate the same prompts (Trainer.predict does not split them)."""
    first = ranks[0] if ranks else {"generated": [], "seconds": 0.0}
    generated = [{"prompt": p, "text": g["text"], "new_tokens": g["new_tokens"]}
                 for p, g in zip(exp.phase.predict_data, first["generated"])]
    tokens, seconds = sum(g["new_tokens"] for g in generated), first["seconds"]
    rate = round(tokens / seconds, 2) if seconds else None
    return {"generated": generated,
            "figures": {"generated_tokens": tokens, "tokens_per_s": rate, "seconds": round(seconds, 3),
                        "tokens_per_s_per_device": round(rate / len(ranks), 2) if rate else None,
                        "weights": exp.phase.load_checkpoint or "random (no phase.load_checkpoint)"}}
