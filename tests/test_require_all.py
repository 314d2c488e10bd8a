"""``DPTRAIN_REQUIRE_ALL=1`` (tests/conftest.py) turns every skip into a failure that keeps the
reason, and without it a skip stays a skip: run on a small suite by a real pytest process."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SUITE = '''
import pytest

def test_needs_a_missing_module():
    pytest.importorskip("dptrain_no_such_module")

@pytest.mark.skip(reason="marked to skip")
def test_marked():
    pass

def test_plain():
    pass

def test_needs_a_gpu():
    pytest.skip("needs a GPU: CuPy is not installed")
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_without_the_variable_skips_stay_skips_with_their_reason(suite, monkeypatch):
    monkeypatch.delenv("DPTRAIN_REQUIRE_ALL", raising=False)
    result = suite.runpytest_subprocess("-ra")
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["SKIPPED *could not import 'dptrain_no_such_module'*"])


def test_with_the_variable_every_skip_fails_with_its_reason(suite, monkeypatch):
    monkeypatch.setenv("DPTRAIN_REQUIRE_ALL", "1")
    result = suite.runpytest_subprocess("-ra")
    # the mark skips in set-up; the GPU skip is allowed (CI has no GPU) and stays a skip
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *needs a GPU: CuPy is not installed"])
    result.stdout.fnmatch_lines([  # the errors (set-up) are listed before the failures
        "DPTRAIN_REQUIRE_ALL=1 forbids skipping, and this test skipped: *marked to skip",
        "DPTRAIN_REQUIRE_ALL=1 forbids skipping, and this test skipped: *could not import "
        "'dptrain_no_such_module'*",
    ])
    assert result.ret != 0


def test_a_bad_value_is_a_usage_error_naming_it(suite, monkeypatch):
    monkeypatch.setenv("DPTRAIN_REQUIRE_ALL", "yes")
    result = suite.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*DPTRAIN_REQUIRE_ALL: must be 1 (skipped tests fail) or 0 or unset, got 'yes'"])
