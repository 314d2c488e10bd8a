"""The job spec: what one training job is, as plain dataclasses, validated field by field.

A job file (YAML or JSON) maps one to one onto `JobSpec`; the coordinator's protobuf
``JobSpec`` mirrors the same fields, so the schema stays flat and explicit::

    name: digits-mlp
    model: {name: mlp, args: {in_features: 64, hidden: [128, 64], out_features: 10}}
    dataset: {name: digits, args: {}, validation_fraction: 0.25}
    optimizer: {name: adam, lr: 1.0e-3}
    scheduler: {name: cosine, args: {T_max: 800}}     # optional
    batch_size: 64                                   # global: split across the ranks
    epochs: 20                                       # and/or max_steps
    eval_every: 100                                  # steps; 0: at the end only
    seed: 0
    workers: 2
    device: cpu                                      # cuda: each rank on its node's GPU
    allreduce: auto                                  # or shared_memory|mpi|host|cuda_aware|nccl
    checkpoint: {every_steps: 100, keep: 3}
    loss: mylosses:focal                             # optional: package.module:function
    code: src                                        # optional: where your modules are

A model, a data set (``dataset.name``) and the ``loss`` may be your own, named
``package.module:function``: the ranks import them from the job file's directory, or from
``code`` (a directory relative to the job file), which they put first on ``sys.path``
(`dptrain.worker.job_code`). Validating a spec checks their syntax only.

Every error names the field's path, the rule it broke and the value it got, e.g.
``optimizer.lr: must be >= 0, got -0.1``; all errors of a spec are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from dptrain.worker.spec_errors import ECHO_CHARS, FieldError, JobSpecError, cut, echo
from dptrain.worker.spec_rules import (
    ALLREDUCE_PATHS,
    CODE_DIGEST_PREFIX,
    DEVICES,
    MAX_BATCH_SIZE,
    MAX_STEPS,
    NAME_RULE,
    OPTIMIZERS,
    SCHEDULERS,
    build_model,
    check_name,
    check_shards,
    code_digest,
    model_constructor,
    validate,
)

__all__ = [
    "JobSpecError", "FieldError", "ECHO_CHARS", "echo", "cut", "ModelSpec", "DatasetSpec",
    "OptimizerSpec", "SchedulerSpec", "CheckpointSpec", "JobSpec", "load_spec", "spec_hash",
    "model_constructor", "build_model", "validate", "trajectory_differences",
    "OPTIMIZERS", "SCHEDULERS", "DEVICES", "ALLREDUCE_PATHS", "MAX_BATCH_SIZE", "MAX_STEPS",
    "NAME_RULE", "check_name", "check_shards", "read_spec_file", "parse_spec_text",
    "check_types", "CODE_DIGEST_PREFIX", "code_digest",
]


@dataclass
class ModelSpec:
    """The model: a name in the model zoo (or ``package.module:function``) and its arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    """The data set: a name in `worker.data`'s registry (or ``package.module:function``), its
    arguments, and the held-out share."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    validation_fraction: float = 0.1


@dataclass
class OptimizerSpec:
    """The optimizer and its hyperparameters (``momentum``/``nesterov`` are SGD's, ``betas``/``eps``
    Adam's and AdamW's)."""

    name: str
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class SchedulerSpec:
    """A learning-rate schedule (``step``, ``cosine`` or ``linear``), stepped once per step."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointSpec:
    """How often to checkpoint (every N steps; 0: only at the end and on SIGTERM) and how many
    checkpoints to keep."""

    every_steps: int = 0
    keep: int = 3


@dataclass
class JobSpec:
    """One training job. Build it with `JobSpec.from_dict` or `load_spec`, which validate.

    ``batch_size`` is the global batch: each of the ``workers`` ranks takes a contiguous
    ``batch_size / workers`` of it. The run stops after ``epochs`` epochs or ``max_steps``
    optimizer steps, whichever comes first. ``loss`` (``package.module:function``, called as
    ``loss(output, target)``) replaces the task's own loss (cross-entropy, or MSE for
    regression); ``code`` is the directory of the job's own modules, relative to the job file
    (default: the job file's directory).

    ``entrypoint`` (``train.py --lr 0.1``: a script in the code directory and its arguments)
    makes the job your own training loop, run on every rank (`dptrain.worker.context`): then
    ``model``, ``dataset``, ``optimizer``, ``batch_size`` and the rest of the declarative loop
    are the script's business and must be left out; ``name``, ``workers``, ``device``,
    ``seed``, ``checkpoint`` and ``code`` still apply. Without it, ``model``, ``dataset``,
    ``optimizer`` and ``batch_size`` are required.
    """

    name: str
    model: ModelSpec | None = None
    dataset: DatasetSpec | None = None
    optimizer: OptimizerSpec | None = None
    batch_size: int | None = None
    epochs: int | None = None
    max_steps: int | None = None
    scheduler: SchedulerSpec | None = None
    eval_every: int = 0
    seed: int = 0
    workers: int = 1
    device: str = "cpu"
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    loss: str | None = None
    code: str | None = None
    entrypoint: str | None = None
    allreduce: str = "auto"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Build and validate a spec from plain data (a parsed job file).

        Args:
            data: the job as nested mappings, lists and scalars.

        Returns:
            The validated spec, defaults filled in.

        Raises:
            JobSpecError: naming every field that breaks a rule.
        """
        errors: list[FieldError] = []
        spec = _parse(cls, data, "", errors)
        if not errors:
            errors += validate(spec)
        if errors:
            raise JobSpecError(errors)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-ready data (every field, defaults included).

        Returns:
            A dict that `from_dict` turns back into an equal spec.
        """
        return _plain(self)

    def replace(self, **changes: Any) -> JobSpec:
        """A validated copy with some top-level fields changed.

        Args:
            changes: field name -> new value (plain data, as in a job file).

        Returns:
            The new spec.
        """
        return JobSpec.from_dict({**self.to_dict(), **changes})


_SCALARS = frozenset({str, int, float, bool, type(None)})
# json.dumps(value, allow_nan=False) without building an encoder at every call.
_STRICT_JSON = json.JSONEncoder(allow_nan=False).encode
_FIELDS: dict[type, dict[str, dataclasses.Field]] = {}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    """A dataclass's fields by name, looked up once per class (`dataclasses.fields` builds a
    tuple at every call, and a submission parses and walks a spec's classes many times)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = {f.name: f for f in dataclasses.fields(cls)}
    return fields


def _plain(value: Any) -> Any:
    # A walk of our own rather than dataclasses.asdict, which deep-copies every leaf: the
    # leaves here are JSON scalars, and a submission's to_dict() is on the server's hot path
    # (so a dataclass's scalar fields are copied here, without a call each).
    if type(value) in _SCALARS:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for name in _fields(type(value)):
            item = getattr(value, name)
            out[name] = item if type(item) in _SCALARS else _plain(item)
        return out
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def spec_hash(spec: JobSpec) -> str:
    """A stable hash of the spec: sha256 of its canonical JSON (sorted keys, defaults filled).

    Args:
        spec: the job spec.

    Returns:
        64 hex digits; equal for equal specs whatever the file's key order or omitted defaults.
    """
    text = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- loading files

class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float, as YAML 1.2 and JSON do (1.1 reads a str)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_spec_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a job file (``.yaml``/``.yml`` or ``.json``) as plain data, checking no field.

    A client sends this to the coordinator, which validates it (`JobSpec.from_dict`); reading
    it imports neither the engine nor any code the job names.

    Args:
        path: the job file.

    Returns:
        The file's mapping of job fields.

    Raises:
        JobSpecError: the file is missing, does not parse, or holds no mapping.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise JobSpecError([FieldError(path, f"cannot read the job file ({e.strerror})")]) from None
    return parse_spec_text(text, path, json_only=path.endswith(".json"))


def parse_spec_text(text: str, where: str, *, json_only: bool = False) -> dict[str, Any]:
    """A job file's text as plain data, checking no field: YAML (JSON is YAML) or JSON.

    The one parser of job files: `read_spec_file`, and the coordinator for a job sent as text
    (``SubmitJobRequest.spec_text``), so that both read ``1e-3`` and every other value alike.

    Args:
        text: the file's text.
        where: what the errors name (the file's path, or the request's field).
        json_only: parse as JSON (a ``.json`` file), not YAML.

    Returns:
        The mapping of job fields.

    Raises:
        JobSpecError: naming `where` when the text does not parse or holds no mapping.
    """
    try:
        if json_only:
            data = json.loads(text)
        else:
            data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        one_line = " ".join(str(e).split())
        raise JobSpecError([FieldError(where, f"does not parse: {one_line}")]) from None
    except RecursionError:  # both parsers recurse once per level of nesting
        raise JobSpecError([FieldError(where, "does not parse: it nests lists and mappings "
                                              "deeper than the parser can follow")]) from None
    if not isinstance(data, Mapping):
        raise JobSpecError([FieldError(where, "must hold a mapping of job fields",
                                       type(data).__name__)])
    return dict(data)


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Read and validate a job file (``.yaml``/``.yml`` or ``.json``).

    Args:
        path: the job file.

    Returns:
        The validated spec.

    Raises:
        JobSpecError: the file is missing, does not parse, or breaks a rule.
    """
    return JobSpec.from_dict(read_spec_file(path))


def check_types(data: Mapping[str, Any]) -> None:
    """Check a job's plain data for unknown fields and wrong types only: the first stage of
    `JobSpec.from_dict`, without the rules that need the model zoo or the data registry.

    A client runs this before it sends a job (its errors name the field as the coordinator's
    would); the coordinator runs all of `JobSpec.from_dict`. Nothing here imports the engine
    or any code the job names.

    Args:
        data: the job file's data.

    Raises:
        JobSpecError: naming every unknown field and every value of the wrong type.
    """
    errors: list[FieldError] = []
    _parse(JobSpec, data, "", errors)
    if errors:
        raise JobSpecError(errors)


# ---------------------------------------------------------------- parsing (types)

_SECTIONS = {"model": ModelSpec, "dataset": DatasetSpec, "optimizer": OptimizerSpec,
             "scheduler": SchedulerSpec, "checkpoint": CheckpointSpec}


_PLANS: dict[tuple[type, str], tuple] = {}


def _parse_plan(cls: type, prefix: str) -> tuple:
    """For each field of `cls` parsed under `prefix`: its name, its path, whether it is
    required, the section class it holds (None: a value) and the field; made once per class
    and prefix, as a submission parses the same few classes every time."""
    plan = _PLANS.get((cls, prefix))
    if plan is None:
        plan = _PLANS[cls, prefix] = tuple(
            (name, f"{prefix}{name}",
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
             _SECTIONS.get(name) if prefix == "" else None, f)
            for name, f in _fields(cls).items())
    return plan


def _parse(cls: type, data: Any, prefix: str, errors: list[FieldError]) -> Any:
    """Build dataclass `cls` from `data`, checking keys and scalar types; None if it failed."""
    where = prefix.rstrip(".") or "job"
    if not isinstance(data, Mapping):
        errors.append(FieldError(where, "must be a mapping", data))
        return None
    fields = _fields(cls)
    n_before = len(errors)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(FieldError(f"{prefix}{key}", f"unknown field{hint}; {where} has "
                                     f"{', '.join(fields)}"))
    kwargs = {}
    for name, path, required, section, f in _parse_plan(cls, prefix):
        if name not in data:
            if required:
                errors.append(FieldError(path, "is required"))
            continue
        value = data[name]
        if section is not None:
            if value is None and f.default is None:  # an optional section left out
                kwargs[name] = None
                continue
            value = _parse(section, value, f"{path}.", errors)
        else:
            value = _check_type(path, f.type, value, errors)
        kwargs[name] = value
    if len(errors) > n_before:
        return None
    return cls(**kwargs)


_KINDS: dict[str, tuple[str, bool]] = {}


def _kind(annotation: str) -> tuple[str, bool]:
    """A field's annotation as (its type without ``| None``, whether None is allowed)."""
    kind = _KINDS.get(annotation)
    if kind is None:
        text = annotation.replace(" ", "")
        kind = _KINDS[annotation] = (text.removesuffix("|None"), text.endswith("|None"))
    return kind


def _check_type(path: str, annotation: str, value: Any, errors: list[FieldError]) -> Any:
    """`value` converted to the field's declared type, or an error."""
    kind, optional = _kind(annotation)
    if value is None and optional:
        return None
    if kind == "str":
        if isinstance(value, str):
            return value
        errors.append(FieldError(path, "must be a string", value))
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            if -(2**63) <= value < 2**63:  # what the coordinator's messages and store carry
                return value
            errors.append(FieldError(path, "must fit in 64 bits (-2**63..2**63-1)", value))
        else:
            errors.append(FieldError(path, "must be an integer", value))
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(FieldError(path, "must be a number", value))
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        errors.append(FieldError(path, "must be true or false", value))
    elif kind == "dict[str,Any]":
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            try:  # arguments travel and are stored as JSON text
                _STRICT_JSON(value)
            except (TypeError, ValueError, RecursionError) as e:
                errors.append(FieldError(path, f"must be JSON data ({e})", value))
                return None
            return dict(value)
        if value is None:
            return {}
        errors.append(FieldError(path, "must be a mapping of argument names to values", value))
    elif kind == "tuple[float,float]":
        if (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return (float(value[0]), float(value[1]))
        errors.append(FieldError(path, "must be a pair of numbers", value))
    else:  # pragma: no cover - a field type this parser does not know
        raise TypeError(f"{path}: unsupported field type {annotation}")
    return None


# ---------------------------------------------------------------- validation (rules)

def trajectory_differences(saved: Mapping[str, Any], spec: JobSpec) -> list[str]:
    """The fields whose change would make a resumed run differ from an uninterrupted one.

    ``name``, ``epochs``, ``max_steps``, ``eval_every``, ``workers``, ``checkpoint`` and
    ``code`` (where the same modules are found) may change between a checkpoint and its
    resumption; everything else must not.

    Args:
        saved: the spec (as `JobSpec.to_dict` gave it) recorded in a checkpoint.
        spec: the spec of the run that resumes.

    Returns:
        Dotted paths of the fields that differ, empty when the run can resume exactly.
    """
    free = {"name", "epochs", "max_steps", "eval_every", "workers", "checkpoint", "code",
            "allreduce"}
    now = spec.to_dict()
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in free:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(key)
    return out
