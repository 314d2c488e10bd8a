"""Helpers for the worker tests: run a Python script under a real ``mpiexec -n N``.

The ``run_mpi`` fixture hands out `run_mpi_script`::

    def test_something(run_mpi):
        result = run_mpi(2, MPI_SCRIPTS / "comm_collectives.py", "--flag")
        assert result.returncode == 0, result.stderr

The pytest process itself never initialises MPI: every MPI test is a child job, and the
timeout only guards against a hang (the whole process group is killed, the test fails with
whatever the ranks printed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MPI_SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def run_mpi_script(n: int, script: str | os.PathLike, *args: str, env: dict | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `script` under ``mpiexec -n n`` with this interpreter, from the repository root.

    Args:
        n: the number of ranks; 0 runs the script with plain ``python`` (no mpiexec), which
            gives MPI's singleton world of size 1.
        script: a path to a .py file, or Python source code.
        *args: command-line arguments for the script.
        env: extra environment variables (added to a copy of this process's environment, with
            one BLAS thread per rank and the repository on PYTHONPATH).
        timeout: seconds before the job counts as hung: it is killed and the test fails.

    Returns:
        The CompletedProcess, with ``stdout`` and ``stderr`` as text and ``returncode``.
    """
    path = Path(script) if isinstance(script, os.PathLike) else None
    tmp = None
    if path is None:
        if "\n" not in script and script.endswith(".py") and Path(script).is_file():
            path = Path(script)
        else:
            tmp = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
            tmp.write(script)
            tmp.close()
            path = Path(tmp.name)
    full_env = dict(os.environ)
    full_env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.update(env or {})
    cmd = [sys.executable, str(path), *map(str, args)]
    if n:
        cmd = [str(MPIEXEC), "-n", str(n), *cmd]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank it started
        out, err = proc.communicate()
        pytest.fail(f"`{' '.join(cmd)}` hung: killed after {timeout} s\n"
                    f"--- stdout\n{out}\n--- stderr\n{err}")
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def json_lines(stdout: str) -> list:
    """Every line of `stdout` that parses as JSON, parsed (ranks print their results so)."""
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


@pytest.fixture(scope="session")
def run_mpi():
    """`run_mpi_script`: ``run_mpi(n, script_path_or_code, *args, env=None, timeout=120)``."""
    return run_mpi_script


@pytest.fixture(scope="session")
def mpi_json():
    """`json_lines`: the JSON lines a script printed, parsed."""
    return json_lines


@pytest.fixture(scope="session")
def mpi_scripts() -> Path:
    """The folder of scripts the MPI tests run."""
    return MPI_SCRIPTS
