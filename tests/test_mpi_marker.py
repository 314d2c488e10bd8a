"""A test that starts ``mpiexec`` or a worker must carry the ``mpi`` marker (tests/conftest.py),
or ``make test-fast`` would run it: checked on a small suite by a real pytest process, with a
stand-in ``mpiexec`` that only exits."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SUITE = '''
import os
import subprocess
import sys

import pytest

MPIEXEC = os.path.join(os.getcwd(), "mpiexec")

def test_unmarked_starts_mpiexec():
    subprocess.run([MPIEXEC, "-n", "2", "true"], check=True)

@pytest.mark.mpi
def test_marked_starts_mpiexec():
    subprocess.run([MPIEXEC, "-n", "2", "true"], check=True)

def test_unmarked_starts_another_program():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


def test_only_the_unmarked_test_that_starts_mpiexec_fails(pytester: pytest.Pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    mpi: starts MPI processes\n")
    pytester.makepyfile(test_suite=SUITE)
    stand_in = pytester.path / "mpiexec"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    result = pytester.runpytest_subprocess("-ra")
    result.assert_outcomes(passed=3, errors=1)  # the failure is reported at teardown
    result.stdout.fnmatch_lines([  # the error's report, then the summary naming the test
        "*started MPI processes without the `mpi` marker (add @pytest.mark.mpi)*",
        "ERROR *test_unmarked_starts_mpiexec*",
    ])
