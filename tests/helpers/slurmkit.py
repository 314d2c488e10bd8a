"""A real single-node Slurm cluster for the tests: Debian's ``munge``, ``slurmctld`` and
``slurmd``, started from a private directory with a configuration of their own.

Nothing system-wide is touched: the daemons, ``sbatch``, ``squeue``, ``scontrol`` and ``scancel``
find the configuration through ``SLURM_CONF``, munge's socket is named in it (``AuthInfo``),
and every port and directory is this bring-up's own, so that several clusters (other test
runs on a shared machine) live side by side. Each bring-up numbers its jobs from a fresh,
random ``FirstJobId``: MPICH names its shared-memory segments ``/dev/shm/mpich_shm_*`` after
the Slurm job and step, and a stale one left by a killed job with a reused id hangs a new job.

Example (root, with the packages installed)::

    with SlurmCluster.start(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env())
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

#: The programs a bring-up needs, from Debian's slurmctld, slurmd, slurm-client and munge.
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel",
            "sinfo", "srun", "salloc")

PARTITION = "debug"


def missing_reason() -> str | None:
    """Why a cluster cannot be brought up on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "a Slurm cluster needs root (slurmd runs the jobs' tasks as their users)"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return (f"the Slurm packages are not installed (no {', '.join(missing)}): "
                f"apt-get install -y slurmctld slurmd slurm-client munge")
    return None


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nothing listens on right now (held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_line() -> str:
    """This machine as a Slurm node, as ``slurmd -C`` measures it (CPUs, sockets, memory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("NodeName="))
    return line


def slurm_conf(root: Path, node: str, ports: list[int], first_job_id: int) -> str:
    """The cluster's ``slurm.conf``: one node, everything under `root`."""
    ctld_port, slurmd_port, srun_low = ports[0], ports[1], ports[2]
    host = node.split()[0].removeprefix("NodeName=")
    return f"""\
ClusterName=dptrain{ctld_port}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SrunPortRange={srun_low}-{srun_low + 40}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=86400
KillWait=5
FirstJobId={first_job_id}
{node} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class SlurmCluster:
    """A running single-node cluster (see the module docstring).

    Attributes:
        root: its directory (configuration, state, logs, munge's key and socket).
        conf: its ``slurm.conf`` (``SLURM_CONF``).
        first_job_id: the id its first job gets.
    """

    root: Path
    conf: Path
    first_job_id: int
    shm_before: frozenset[str] = frozenset()

    @classmethod
    def start(cls, root: Path) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and slurmd, and wait until the
        node is idle. On failure, whatever started is stopped again.

        Args:
            root: an empty (or missing) directory of this bring-up's own.

        Returns:
            The cluster (stop it with `stop`).
        """
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)  # munged refuses a key or socket in a directory others may write
        for sub in ("munge", "ctld", "spool"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "plugstack.conf").write_text("")
        first_job_id = random.randrange(1_000_000, 60_000_000)
        cluster = cls(root, root / "slurm.conf", first_job_id,
                      frozenset(glob.glob("/dev/shm/mpich_shm_*")))
        cluster.conf.write_text(slurm_conf(root, node_line(), _free_ports(3), first_job_id))
        try:
            subprocess.run(["munged", "--force", f"--socket={root}/munge/munge.socket",
                            f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                            f"--log-file={root}/munge/munged.log",
                            f"--seed-file={root}/munge/munged.seed"],
                           check=True, capture_output=True, env=cluster.env())
            subprocess.run(["slurmctld", "-i", "-f", str(cluster.conf)], check=True,
                           capture_output=True, env=cluster.env())
            subprocess.run(["slurmd", "-f", str(cluster.conf)], check=True,
                           capture_output=True, env=cluster.env())
            cluster.wait_idle()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose Slurm commands talk to this cluster."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until the node is up and idle (the daemons answer within a second)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            got = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True,
                                 text=True, env=self.env())
            state = (got.stdout + got.stderr).strip()
            if state == "idle":
                return
            time.sleep(0.1)
        raise RuntimeError(f"the Slurm node is not idle after {timeout} s (sinfo: {state!r}); "
                           f"see {self.root}/slurmctld.log and slurmd.log")

    def jobs(self) -> list[int]:
        """The ids of this cluster's jobs that are pending or running."""
        got = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True,
                             text=True, env=self.env())
        return [int(word) for word in got.stdout.split() if word.isdigit()]

    def stop(self) -> None:
        """Cancel every job, stop the daemons (slurmd, slurmctld, munged) and remove the
        shared-memory segments MPICH left for this cluster's jobs. Idempotent."""
        if (self.root / "slurmctld.pid").exists():
            subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"],
                           capture_output=True, env=self.env())
        for name in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            _stop_pid_file(self.root / name)
        # Only segments that appeared meanwhile and that no process holds: other jobs on
        # this shared machine (another test run's) keep theirs.
        held = _held_shm()
        for path in set(glob.glob("/dev/shm/mpich_shm_*")) - self.shm_before - held:
            try:
                os.unlink(path)
            except OSError:
                pass

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _held_shm() -> set[str]:
    """The ``/dev/shm`` files some process of this machine maps or has open."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                held.update(line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target)
        except OSError:  # gone meanwhile
            continue
    return {path.removesuffix(" (deleted)") for path in held}


def _stop_pid_file(path: Path) -> None:
    """SIGTERM the daemon a pid file names, wait for it to exit (SIGKILL after a while)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
