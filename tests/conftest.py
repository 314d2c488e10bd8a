"""Shared by every test folder: the fixtures several folders use (the repository root, a
state directory, a coordinator server); a test that starts ``mpiexec`` or a worker without the
``mpi`` marker fails; and with ``DPTRAIN_REQUIRE_ALL=1`` a skipped test fails.

``make test-fast`` leaves out the ``mpi`` tests, so an unmarked one would slow the quick loop
down unnoticed: an audit hook sees every process this one starts (not those its children
start) and the test that started it fails.

Some tests skip where an optional tool is missing (the PyTorch parity tests without the
``test-torch`` extra, the several-hosts tests without root and iproute2), which is right on
a newcomer's machine and wrong in CI: there a skip would hide that the tests never ran. CI
sets the variable, and every skip, whether in collection, set-up or the test itself, becomes a
failure that keeps the skip's reason. The one exception is the device tests' "needs a GPU" (and
"needs no GPU") skips: CI has no GPU, so those are expected there (`ALLOWED_SKIPS`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ALL = "DPTRAIN_REQUIRE_ALL"


def _require_all() -> bool:
    value = os.environ.get(REQUIRE_ALL, "")
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{REQUIRE_ALL}: must be 1 (skipped tests fail) or 0 or unset, "
                                f"got {value!r}")
    return value == "1"


def pytest_configure(config: pytest.Config) -> None:
    _require_all()  # a bad value stops the run before any test
    sys.addaudithook(_note_unmarked_mpi)


_current: list[pytest.Item] = []  # the test being run (set-up and teardown included)
_unmarked_mpi: dict[str, list[str]] = {}  # node id -> the MPI command lines it started


def _starts_mpi(words: list[str]) -> bool:
    """Whether a command line is ``mpiexec ...`` or ``python [-m mpi4py] -m dptrain.worker ...`` (a
    stand-in ``mpiexec`` script that gets a worker's command line is neither)."""
    return (bool(words) and os.path.basename(words[0]) == "mpiexec"
            or words[1:3] == ["-m", "dptrain.worker"]
            or words[1:5] == ["-m", "mpi4py", "-m", "dptrain.worker"])


def _note_unmarked_mpi(event: str, args: tuple) -> None:
    if event != "subprocess.Popen" or not _current:
        return
    argv = args[1]  # (executable, args, cwd, env): args is a string with shell=True
    words = [os.fsdecode(a) for a in ([argv] if isinstance(argv, (str, bytes)) else argv)]
    item = _current[-1]
    if item.get_closest_marker("mpi") is None and _starts_mpi(words):
        _unmarked_mpi.setdefault(item.nodeid, []).append(" ".join(words))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current.append(item)
    try:
        yield
    finally:
        _current.pop()


# Skip reasons that stay skips under DPTRAIN_REQUIRE_ALL=1 (tests/helpers/devices.py): no CI
# machine has a GPU, and `.ci/run` cannot install one.
ALLOWED_SKIPS = ("needs a GPU", "needs no GPU")


def _fail_if_skipped(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not _require_all():
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if reason.removeprefix("Skipped: ").startswith(ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = f"{REQUIRE_ALL}=1 forbids skipping, and this test skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    _fail_if_skipped(report)
    started = _unmarked_mpi.pop(item.nodeid, None) if call.when == "teardown" else None
    if started:
        report.outcome = "failed"
        report.longrepr = ("started MPI processes without the `mpi` marker (add "
                           "@pytest.mark.mpi):\n" + "\n".join(started))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


# ---------------------------------------------------------------- shared fixtures
# Their imports are inside: tests/test_require_all.py runs this file where tests/helpers is not
# on the path, and the engine tests should not load grpc.

@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root directory (examples/, pyproject.toml, the package folders)."""
    from repo import REPO

    return REPO


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A coordinator state directory for this test, not yet created (the coordinator makes
    it, private, as it does for a user)."""
    return tmp_path / "state"


@pytest.fixture
def serve_coordinator(state_dir: Path) -> Iterator[Callable[..., Any]]:
    """``serve_coordinator(stop_grace=0, runner_factory=None, **settings)`` starts a real
    coordinator on a free loopback port over `state_dir` (`settings` are the other fields of
    `dptrain.coordinator.server.server.ServerSettings`, e.g. ``port=`` to restart on the same
    one) and returns it; every one started is stopped at the end, giving in-flight calls
    `stop_grace` seconds, whether the test passed or not. Its data port is any free port
    unless ``data_port=`` says otherwise: a restart on the same gRPC port must not need the
    port after it free (the default of a fixed gRPC port)."""
    from dptrain.coordinator.server.server import ServerSettings, serve

    started: list[tuple[Any, float]] = []

    def start(*, stop_grace: float = 0.0, runner_factory: Any = None, **settings: Any) -> Any:
        settings.setdefault("data_port", 0)
        server = serve(ServerSettings(state_dir, **settings), runner_factory=runner_factory)
        started.append((server, stop_grace))
        return server

    yield start
    for server, grace in started:
        server.stop(grace=grace)
