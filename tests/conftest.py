"""Shared by every test folder: the fixtures several folders use (the repository root, a
state directory, a coordinator server), and with ``DPTRAIN_REQUIRE_ALL=1`` a skipped test fails.

Some tests skip where an optional tool is missing (the PyTorch parity tests without the
``test-torch`` extra, the TLS test without ``openssl`` or ``cryptography``), which is right on
a newcomer's machine and wrong in CI: there a skip would hide that the tests never ran. CI
sets the variable, and every skip, whether in collection, set-up or the test itself, becomes a
failure that keeps the skip's reason.
"""

from __future__ import annotations

import os
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


def _fail_if_skipped(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not _require_all():
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    report.outcome = "failed"
    report.longrepr = f"{REQUIRE_ALL}=1 forbids skipping, and this test skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


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
    """``serve_coordinator(stop_grace=0, **options)`` starts a real coordinator on a free
    loopback port over `state_dir` (`options` as for
    `dptrain.coordinator.server.server.serve`, e.g. ``port=`` to restart on the same one) and
    returns it; every one started is stopped at the end, giving in-flight calls `stop_grace`
    seconds, whether the test passed or not."""
    from dptrain.coordinator.server.server import serve

    started: list[tuple[Any, float]] = []

    def start(*, stop_grace: float = 0.0, **options: Any) -> Any:
        server = serve(state_dir, **options)
        started.append((server, stop_grace))
        return server

    yield start
    for server, grace in started:
        server.stop(grace=grace)
