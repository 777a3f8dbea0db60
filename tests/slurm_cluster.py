"""A one-node Slurm cluster on this machine for the tests: Debian's slurm-wlm and munge, installed when missing
(root and the package registry needed), configured in a temporary folder and started as our own processes
(munged, slurmctld, slurmd in the foreground), stopped by PID afterwards.

No accounting database: plain `sacct` says "accounting storage is disabled" (submitit tolerates that, it reads
its jobs' result files); the job states come from the job-completion log, `sacct --completion`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from qwen15_exp.launch.msrun import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")


def missing_tools() -> list[str]:
    return [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "sacct", "srun", "sinfo") if not shutil.which(t)]


def install() -> str | None:
    """Install Slurm and munge if missing; the reason it cannot, or None."""
    if not missing_tools():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"Slurm is not installed ({', '.join(missing_tools())} missing) and this is not a root Debian machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-300:]}"
    return None if not missing_tools() else f"still missing after install: {', '.join(missing_tools())}"


def slurm_conf(folder: Path, host: str, cpus: int) -> str:
    ports = (free_port(), free_port())
    return "\n".join([
        "ClusterName=qwen15test", f"SlurmctldHost={host}",
        f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
        "AuthType=auth/munge", f"AuthInfo=socket={folder}/munge.socket", "CredType=cred/munge",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={folder}/jobcomp.txt",
        "MpiDefault=none", "ReturnToService=2", "MinJobAge=3600",
        f"NodeName={host} CPUs={cpus} RealMemory=16000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.folder, host, os.cpu_count() or 1))
        f = self.folder
        self._spawn(["munged", "-F", "--force", f"--socket={f}/munge.socket", "--key-file=/etc/munge/munge.key",
                     f"--log-file={f}/munged.log", f"--pid-file={f}/munged.pid", f"--seed-file={f}/munged.seed"])
        self._wait(lambda: (f / "munge.socket").exists(), "munged")
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, "slurmd to register an idle node")

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.folder / f"{Path(argv[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.3)
        logs = {p.name: p.read_text()[-500:] for p in self.folder.glob("*.out")}
        raise RuntimeError(f"waiting for {what} failed: {logs}")

    def job_states(self) -> dict[str, str]:
        """JobId -> state of every finished job, from the job-completion log (`sacct --completion`)."""
        r = subprocess.run(["sacct", "--completion", "-P", "-o", "JobID,JobName,State"], env=self.env,
                           capture_output=True, text=True, check=True)
        rows = [line.split("|") for line in r.stdout.strip().splitlines()[1:]]
        return {row[0]: row[2] for row in rows if row and row[0]}

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons by PID (slurmd and slurmctld first, munged last)."""
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)

    def left_running(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]
