"""The one reader of JSON text that arrives in requests: model, data set and scheduler
``args_json``, and checkpoint manifests.

Python's `json.loads` is laxer than its own strict writer: it reads ``NaN``, ``Infinity`` and
``1e999`` (as infinity), which ``json.dumps(allow_nan=False)`` then refuses, so a value read
that way can be stored but never sent back. And it recurses once per level of nesting, so a
few thousand brackets end in a RecursionError. `loads` refuses both, naming the field: what it
returns can always be written back, and its depth is bounded before the parser sees it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from dptrain.coordinator.api.errors import ValidationError

__all__ = ["loads"]

# A JSON string (brackets inside it do not nest), and the brackets that do.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth_exceeds(text: str, max_depth: int) -> bool:
    """True when the brackets of `text` nest deeper than `max_depth` (no recursion)."""
    # That takes more than max_depth opening brackets: most texts have fewer, and counting
    # them is ~30x cheaper than the scan (every submission's arguments pass here).
    if text.count("[") + text.count("{") <= max_depth:
        return False
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > max_depth:
            return True
    return False


class _NonFinite(ValueError):
    """A constant (``NaN``, ``Infinity``) or a number beyond a double's range, as written."""


def _refuse(constant: str) -> NoReturn:
    raise _NonFinite(constant)


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise _NonFinite(number)
    return value


# One decoder for every call: json.loads builds one whenever it is given a hook, which cost
# as much as parsing a submission's arguments.
_FINITE_ONLY = json.JSONDecoder(parse_constant=_refuse, parse_float=_finite)


def loads(text: str | bytes, field: str, *, max_depth: int, allow_nan: bool = False) -> Any:
    """Parse JSON text from a request.

    Args:
        text: the JSON text (bytes must be UTF-8).
        field: the field it came in, for the error message (e.g. ``model.args``).
        max_depth: the most levels of arrays and objects it may nest.
        allow_nan: accept ``NaN``, ``Infinity`` and numbers beyond a double's range (as
            infinities); off, they are refused, as ``json.dumps(allow_nan=False)`` would.

    Returns:
        The parsed value.

    Raises:
        ValidationError: naming `field`: not UTF-8, not JSON, too deep, or a non-finite number.

    Example:
        >>> loads('{"hidden": [64, 32]}', "model.args", max_depth=32)
        {'hidden': [64, 32]}
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValidationError(field, f"must be UTF-8 JSON text ({e.reason} at byte "
                                  f"{e.start})", f"{len(text)} bytes") from None
    if _depth_exceeds(text, max_depth):
        raise ValidationError(field, f"must nest arrays and objects at most {max_depth} "
                              "levels deep", text)

    try:
        # json.loads refuses a byte order mark before parsing; the decoder alone would not.
        if allow_nan or text.startswith("\ufeff"):
            return json.loads(text)
        return _FINITE_ONLY.decode(text)
    except _NonFinite as e:
        raise ValidationError(field, "must hold only finite numbers (no NaN or Infinity)",
                              e.args[0]) from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ValidationError(field, f"must be JSON text ({e})", text) from None
