"""What an import loads, seen from a fresh interpreter: its ``sys.modules`` is an independent
record of every module a statement pulled in, however indirectly."""

from __future__ import annotations

import json
import subprocess
import sys


def modules_loaded_by(statement: str) -> set[str]:
    """Every module a fresh interpreter holds after running `statement` (e.g. an import).

    Args:
        statement: Python code to run first.

    Returns:
        The names in its ``sys.modules``.
    """
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def within(modules: set[str], *prefixes: str) -> list[str]:
    """The `modules` that are one of `prefixes` or inside one of them, sorted."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))
