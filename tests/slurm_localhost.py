"""A single-node Slurm cluster on this machine, for the Slurm engine test.

Installs slurm-wlm and munge from the distribution when missing (as root), writes slurm.conf
and cgroup.conf for this host under a scratch folder, starts munged, slurmctld and slurmd,
waits for the node to be idle and stops them afterwards. :func:`install` says why a
cluster cannot be had here (not root, packages not installable), for the skip message.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from debian import apt_install

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


def install() -> str | None:
    """Install the packages if a daemon is missing; the reason it cannot be done, or None."""
    return apt_install(PACKAGES, lambda: all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists()
                                             for d in DAEMONS))


class LocalSlurm:
    """munged, slurmctld and slurmd for this host, configured under ``root``."""

    def __init__(self, root: Path, cpus: int | None = None, memory_mb: int = 6000):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.pids: list[int] = []

    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "munge", "run"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""ClusterName=panaceatest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (r / "cgroup.conf").write_text("CgroupPlugin=autodetect\nCgroupAutomount=yes\n"
                                      "ConstrainCores=no\nConstrainRAMSpace=no\n")

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemons and wait until the node is idle (RuntimeError with the logs)."""
        self.write_config()
        r = self.root
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self._spawn(["munged", "--force", "-F", f"--key-file={key}",
                     f"--socket={r}/munge/munge.socket", f"--pid-file={r}/munge/munged.pid",
                     f"--log-file={r}/munge/munged.log", f"--seed-file={r}/munge/seed"])
        time.sleep(0.5)
        os.environ["SLURM_CONF"] = str(self.conf)
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        time.sleep(1.0)
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                                 text=True, env=self.env())
            state = out.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(1.0)
        raise RuntimeError(f"slurm node not idle after {timeout:.0f} s (state {state!r}); "
                           f"logs in {r}/log")

    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{cmd[0]}.out", "ab")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                start_new_session=True)
        self.pids.append(proc.pid)

    def stop(self) -> None:
        """Cancel the jobs left and stop the daemons this object started (by pid)."""
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True,
                       env=self.env())
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.pids.clear()
