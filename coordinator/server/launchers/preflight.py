"""The preflight: before a job's ranks start on other hosts, reach each host the way Hydra will
and check what the ranks need there, so a job that cannot run fails with one line naming the
host and the cause instead of ``mpiexec`` exiting 255 with the cause buried in the log.

Each check is one remote-shell command line, a pure function of the placement
(`preflight_commands`, tested by comparing strings): ``ssh -x -o BatchMode=yes HOST "script"``
by default, or ``CMD -x HOST "script"`` when Hydra gets ``-launcher-exec CMD``, since Hydra
calls its launcher exactly so. The script checks, in this order, that the interpreter the ranks
run exists, that it imports dptrain of this very version, and that the paths every rank reads
are there: the job's directory or file (on a shared file system), the data files its spec names
(inside the coordinator's ``--data-root`` directories) and the CA certificate the workers
verify the coordinator with (`base.SharedPath`), each failure naming the path and what it is
for. Hosts that mean this machine (``localhost``) are not checked: ``mpiexec`` starts their
ranks without a remote shell. `run_preflight` runs the checks on every host at once and raises
`LaunchError` for the first failing host in placement order.

Both the coordinator's `MpiexecLauncher` and ``dptrain run --hostfile`` run it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from dptrain import __version__
from dptrain.coordinator.server.launchers.base import LaunchError, SharedPath
from dptrain.worker.hostfile import LOCAL_HOSTS, Placement

__all__ = ["HostCheck", "remote_shell", "check_script", "preflight_commands", "run_preflight"]

#: The script's exit code for "reached the host, and a check failed" (its one output line says
#: which); any other failure is the remote shell's: the host was not reached.
CHECK_FAILED = 97
_TIMEOUT_S = 120.0  # a remote shell that hangs must not hold the scheduler forever


@dataclass(frozen=True)
class HostCheck:
    """One host's check: the command line that runs it through the remote shell."""

    host: str
    argv: tuple[str, ...]


def remote_shell(host: str, command: str, launcher_exec: str | None = None) -> list[str]:
    """The command line that runs `command` on `host` as Hydra's launcher would.

    Args:
        host: the host.
        command: one shell command string, run by the remote login shell.
        launcher_exec: Hydra's ``-launcher-exec`` (split like a shell word list); None: ssh,
            never prompting for a password.

    Returns:
        The argument list.
    """
    if launcher_exec:
        return [*shlex.split(launcher_exec), "-x", host, command]
    return ["ssh", "-x", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, command]


def check_script(python: str, paths: Sequence[str | os.PathLike | SharedPath],
                 version: str = __version__) -> str:
    """The shell script a host runs: silent and exit 0 when all is well, else one line on
    stdout and exit `CHECK_FAILED`.

    Args:
        python: the interpreter the ranks run there.
        paths: files or directories every rank reads, which must exist there (a plain path:
            one on the shared file system).
        version: the dptrain version the ranks must have.
    """
    py = shlex.quote(python)
    fail = f"exit {CHECK_FAILED}; }}"
    steps = [f"test -x {py} || {{ echo 'no Python at {python} (the same virtual environment "
             f"must be at the same path on every host)'; {fail}",
             f"v=$({py} -c 'import dptrain; print(dptrain.__version__)' 2>&1) || "
             f"{{ echo \"{python} cannot import dptrain: $(echo \"$v\" | tail -n 1)\"; {fail}",
             f"test \"$v\" = {shlex.quote(version)} || {{ echo \"dptrain $v there, "
             f"{version} here\"; {fail}"]
    for item in paths:
        need = item if isinstance(item, SharedPath) else SharedPath(os.fspath(item))
        steps.append(f"test -e {shlex.quote(need.path)} || {{ echo "
                     f"{shlex.quote(f'no {need.path} there ({need.why})')}; {fail}")
    return "; ".join(steps)


def preflight_commands(placement: Placement, *, python: str,
                       paths: Sequence[str | os.PathLike | SharedPath],
                       launcher_exec: str | None = None) -> list[HostCheck]:
    """The checks of a placement's hosts beyond this machine, in placement order.

    Args:
        placement: ``(host, slots)`` pairs.
        python: the interpreter the ranks run.
        paths: what every rank reads (the job's directory or file, its data files ...).
        launcher_exec: the remote shell (see `remote_shell`).

    Returns:
        One `HostCheck` per host that is not this machine.
    """
    script = check_script(python, paths)
    return [HostCheck(host, tuple(remote_shell(host, script, launcher_exec)))
            for host, _ in placement if host not in LOCAL_HOSTS]


def run_preflight(checks: Sequence[HostCheck]) -> None:
    """Run every host's check at once.

    Raises:
        LaunchError: ``preflight: host H: cause`` for the first failing host in order.
    """
    procs = []
    for check in checks:
        try:
            procs.append((check, subprocess.Popen(
                check.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)))
        except OSError as e:
            for _, proc in procs:
                proc.kill()
                proc.wait()
            raise LaunchError(f"preflight: host {check.host}: cannot run the remote shell "
                              f"{check.argv[0]}: {e.strerror or e}") from None
    failures = []
    for check, proc in procs:
        try:
            output, _ = proc.communicate(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failures.append(f"host {check.host}: unreachable: {check.argv[0]} gave no answer "
                            f"in {_TIMEOUT_S:g} s")
            continue
        if proc.returncode == 0:
            continue
        lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        if proc.returncode == CHECK_FAILED:
            failures.append(f"host {check.host}: {last}")
        else:
            failures.append(f"host {check.host}: unreachable through {check.argv[0]} "
                            f"(exit code {proc.returncode}): {last}")
    if failures:
        more = f" (and {len(failures) - 1} more host(s))" if len(failures) > 1 else ""
        raise LaunchError(f"preflight: {failures[0]}{more}")
