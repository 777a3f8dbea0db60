"""Soak: a sweep of small CPU jobs, mixed valid, invalid, crashing and one killed mid-way then resumed.

    .venv/bin/python bench/soak.py [--ok 14]

The sweep runs through `python -m qwen15_exp -m +soak=...` (job kinds are a config group written to a
temporary search path). While the long job trains, the whole sweep process is SIGKILLed (as a scheduler or
the OOM killer would); then the same sweep is run again into the same sweep dir, which keeps finished jobs,
resumes the killed one from its checkpoint and runs the rest. Prints: jobs done, failed as expected, resumed,
lost (must be 0), orphan processes and held ports (must be 0), and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from job import scratch

KINDS = {
    "ok": "phase: {{max_steps: 3, seed: {i}, checkpoint: {{keep_after_success: 0}}}}",
    "invalid": "phase: {{batch_size: 0, seed: {i}}}",                         # validate() rejects it: exit 2
    "crash": "phase: {{max_steps: 3, seed: {i}}}\nmindformers: {{optimizer: {{type: NoSuchOptimizer}}}}",
    "long": "phase: {{max_steps: 24, seed: {i}, checkpoint: {{save_steps: 3, keep_after_success: 0}}}}",
}


def write_group(root: Path, jobs: list[tuple[str, int]]) -> None:
    (root / "soak").mkdir(parents=True)
    for kind, i in jobs:
        body = KINDS[kind].format(i=i)
        (root / "soak" / f"{kind}_{i}.yaml").write_text(
            f"# @package _global_\ndefaults:\n  - override /hardware: cpu\n\n{body}\n")


def sweep_cmd(conf: Path, sweep_dir: Path, jobs: list[tuple[str, int]]) -> list[str]:
    return [sys.executable, "-m", "qwen15_exp", "-m", f"hydra.searchpath=[file://{conf}]",
            f"hydra.sweep.dir={sweep_dir}", "+soak=" + ",".join(f"{k}_{i}" for k, i in jobs)]


def job_dir_of(sweep_dir: Path, name: str) -> Path | None:
    for overrides in sweep_dir.glob("*/.hydra/overrides.yaml"):
        if f"+soak={name}" in overrides.read_text():
            return overrides.parent.parent
    return None


def steps_done(job_dir: Path | None) -> int:
    log = job_dir / "steps_rank0.jsonl" if job_dir else None
    return sum(1 for _ in log.open()) if log and log.is_file() else 0


def leftovers(sweep_dir: Path) -> tuple[list, set]:
    procs, ports = [], set()
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if str(sweep_dir) in " ".join(p.info["cmdline"] or []) or str(sweep_dir) in (p.info["cwd"] or ""):
                if p.pid != os.getpid():
                    procs.append(p)
                    ports |= {c.laddr.port for c in p.net_connections() if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs, ports


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ok", type=int, default=14)
    args = ap.parse_args()
    jobs = [("ok", i) for i in range(1, 4)] + [("long", 100)] + [("invalid", i) for i in range(1, 4)] + \
           [("crash", i) for i in range(1, 3)] + [("ok", i) for i in range(4, args.ok + 1)]
    with scratch("qwen15_soak.") as work:
        conf, sweep_dir = work / "conf", work / "sweep"
        write_group(conf, jobs)
        env = {**os.environ, "QWEN15_EXP_OUTPUTS": str(work / "outputs")}
        t0 = time.time()
        first = subprocess.Popen(sweep_cmd(conf, sweep_dir, jobs), env=env, cwd=work, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        while steps_done(job_dir_of(sweep_dir, "long_100")) < 8:
            if first.poll() is not None:
                raise SystemExit(f"the sweep ended before the long job trained (exit {first.returncode}); see {sweep_dir}")
            time.sleep(0.2)
        tree = [psutil.Process(first.pid)] + psutil.Process(first.pid).children(recursive=True)
        first.kill()                                      # SIGKILL the sweep, mid-way through the long job
        first.wait()
        _, alive = psutil.wait_procs(tree, timeout=30)
        killed_at = time.time() - t0
        second = subprocess.run(sweep_cmd(conf, sweep_dir, jobs), env=env, cwd=work, capture_output=True, text=True)
        wall = time.time() - t0
        results = {}
        for kind, i in jobs:
            d = job_dir_of(sweep_dir, f"{kind}_{i}")
            results[(kind, i)] = json.loads((d / "result.json").read_text()) if d and (d / "result.json").is_file() else {}
        expected = {"ok": "ok", "long": "ok", "invalid": "invalid", "crash": "failed"}
        done = sum(r.get("status") == "ok" for r in results.values())
        as_expected = sum(r.get("status") == expected[k] for (k, _), r in results.items() if k in ("invalid", "crash"))
        resumed = sum(bool(r.get("resumed_from_step")) for r in results.values())
        lost = sum(r.get("status") != expected[k] for (k, _), r in results.items())
        procs, ports = leftovers(work)
        report = (sweep_dir / "sweep_report.md").read_text() if (sweep_dir / "sweep_report.md").is_file() else ""
        print(f"soak: {len(jobs)} jobs ({sum(k in ('ok', 'long') for k, _ in jobs)} valid, "
              f"{sum(k == 'invalid' for k, _ in jobs)} invalid, {sum(k == 'crash' for k, _ in jobs)} crashing, 1 killed "
              f"mid-way at {killed_at:.0f} s and resumed)")
        print(f"  jobs done (ok)          {done}")
        print(f"  failed as expected      {as_expected}   (invalid + crashing; classes in the report: "
              f"{sorted({r.get('failure_class') for (k, _), r in results.items() if k == 'crash'} - {None})})")
        print(f"  resumed                 {resumed}")
        print(f"  lost                    {lost}   (limit 0)")
        print(f"  orphans after the kill  {sum(p.is_running() for p in alive)}   (limit 0)")
        print(f"  orphan processes now    {len(procs)}   held ports {len(ports)}   (limit 0)")
        print(f"  second sweep exit code  {second.returncode} (1: some jobs did not end ok, as planned)")
        print(f"  report rows with reason {sum(1 for line in report.splitlines() if '| invalid |' in line or '| failed |' in line)}")
        print(f"  wall time               {wall:.0f} s")
        if lost or procs or ports or any(p.is_running() for p in alive):
            sys.exit(1)


if __name__ == "__main__":
    main()
