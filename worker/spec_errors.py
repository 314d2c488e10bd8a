"""How a job spec's errors are told: each broken rule as the field's path, the rule and the value
it got (`FieldError`), all of a spec's together (`JobSpecError`), values quoted short.

Kept apart from `dptrain.worker.spec` so that the coordinator's error types quote values the
same way without the spec's parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ECHO_CHARS", "echo", "cut", "FieldError", "JobSpecError"]

_NO_VALUE: Any = type("_NoValue", (), {"__repr__": lambda self: "<no value>"})()

ECHO_CHARS = 120
"""The most characters of a value (or of a field path) an error message quotes."""


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to `limit` characters, for quoting what was sent in an error message.

    A message is cut to a fixed length on its way to a client; quoting the value short keeps
    the rule, which says what to fix, inside that length.

    Args:
        value: anything.
        limit: the most characters to return.

    Returns:
        The repr, or its first characters and ``"..."``.

    Example:
        >>> echo("x" * 1000, limit=8)
        "'xxxx..."
    """
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to `limit` characters (a field path that quotes a user's key)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class FieldError:
    """One broken rule: the field's dotted path, the rule, and the offending value."""

    path: str
    rule: str
    value: Any = _NO_VALUE

    def __str__(self) -> str:
        if self.value is _NO_VALUE:
            return f"{cut(self.path)}: {self.rule}"
        return f"{cut(self.path)}: {self.rule}, got {echo(self.value)}"


class JobSpecError(ValueError):
    """A job spec that cannot run; ``errors`` lists every broken rule (path, rule, value).

    Args:
        errors: the broken rules (at least one).
    """

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))
