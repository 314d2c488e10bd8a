"""Shared by every test folder: with ``DPTRAIN_REQUIRE_ALL=1`` a skipped test fails.

Some tests skip where an optional tool is missing (the PyTorch parity tests without the
``test-torch`` extra, the TLS test without ``openssl`` or ``cryptography``), which is right on
a newcomer's machine and wrong in CI: there a skip would hide that the tests never ran. CI
sets the variable, and every skip, whether in collection, set-up or the test itself, becomes a
failure that keeps the skip's reason.
"""

from __future__ import annotations

import os

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
