"""`api.strict_json.loads`: what it accepts is what Python's own parser reads; what it refuses
names the field, the rule and the value as written."""

from __future__ import annotations

import json

import pytest

from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.api.strict_json import loads


@pytest.mark.parametrize("text", ['{"hidden": [64, 32], "p": 0.5, "x": null}', "[1.25e3, -0.0]",
                                  '"\\u00e9"', "7", '{"a": {"b": [true, false, 1e308]}}'])
def test_finite_json_reads_as_pythons_parser_reads_it(text):
    assert loads(text, "model.args", max_depth=32) == json.loads(text)
    assert loads(text.encode(), "model.args", max_depth=32) == json.loads(text)


@pytest.mark.parametrize(("text", "value"), [
    ('{"lr": NaN}', "NaN"), ("[Infinity]", "Infinity"), ('{"a": [-Infinity]}', "-Infinity"),
    ('{"big": 1e999}', "1e999"), ("[-2.5e400]", "-2.5e400")])
def test_non_finite_numbers_are_refused_as_written(text, value):
    for _ in range(2):  # the decoder is shared between calls: the second must fail alike
        with pytest.raises(ValidationError) as info:
            loads(text, "model.args", max_depth=32)
        assert (info.value.field, info.value.rule, info.value.value) == (
            "model.args", "must hold only finite numbers (no NaN or Infinity)", value)
    assert loads(text, "model.args", max_depth=32, allow_nan=True) is not None


@pytest.mark.parametrize("allow_nan", [False, True])
def test_a_byte_order_mark_and_broken_text_are_not_json(allow_nan):
    for text in ('\ufeff{"a": 1}', '{"a": 1', "{'a': 1}", ""):
        with pytest.raises(ValidationError, match="must be JSON text") as info:
            loads(text, "dataset.args", max_depth=32, allow_nan=allow_nan)
        assert info.value.field == "dataset.args"


def test_depth_counts_brackets_that_nest_not_those_in_strings():
    # 32 levels pass and 33 do not, with or without many more brackets inside strings.
    strings = '"[[[[{{{{", ' * 20
    for depth, fails in ((32, False), (33, True)):
        for filler in ("", strings):
            text = "[" * depth + filler + "1" + "]" * depth
            if fails:
                with pytest.raises(ValidationError, match="at most 32 levels deep"):
                    loads(text, "model.args", max_depth=32)
            else:
                assert loads(text, "model.args", max_depth=32) == json.loads(text)
