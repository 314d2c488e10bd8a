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
    checkpoint: {every_steps: 100, keep: 3}

Every error names the field's path, the rule it broke and the value it got, e.g.
``optimizer.lr: must be >= 0, got -0.1``; all errors of a spec are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from dptrain.worker.spec_errors import ECHO_CHARS, FieldError, JobSpecError, cut, echo

__all__ = [
    "JobSpecError", "FieldError", "ECHO_CHARS", "echo", "cut", "ModelSpec", "DatasetSpec",
    "OptimizerSpec", "SchedulerSpec", "CheckpointSpec", "JobSpec", "load_spec", "spec_hash",
    "model_constructor", "build_model", "validate", "trajectory_differences",
    "OPTIMIZERS", "SCHEDULERS", "DEVICES", "MAX_BATCH_SIZE", "MAX_STEPS", "NAME_RULE",
    "check_name", "check_shards", "read_spec_file", "check_types",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
# Spec name -> engine.optim.lr_scheduler class name; stepped once per training step.
SCHEDULERS = {"step": "StepLR", "cosine": "CosineAnnealingLR", "linear": "LinearLR"}
DEVICES = ("cpu", "cuda", "auto")  # auto: cuda where CuPy sees a GPU, else cpu
MAX_BATCH_SIZE = 2**20
"""The largest global ``batch_size`` (a million samples per step)."""
MAX_STEPS = 10**9
"""The most optimizer steps a run may take (``max_steps``; ``epochs`` as the workers count
them): more could only run until someone cancels it."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = ("must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a "
             "letter or digit")
"""What a job's name must be (the one statement of the rule; `check_name` applies it)."""


@dataclass
class ModelSpec:
    """The model: a name in the model zoo (or ``package.module:function``) and its arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    """The data set: a name in `worker.data`'s registry, its arguments, and the held-out share."""

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
    optimizer steps, whichever comes first.
    """

    name: str
    model: ModelSpec
    dataset: DatasetSpec
    optimizer: OptimizerSpec
    batch_size: int
    epochs: int | None = None
    max_steps: int | None = None
    scheduler: SchedulerSpec | None = None
    eval_every: int = 0
    seed: int = 0
    workers: int = 1
    device: str = "cpu"
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)

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


def _plain(value: Any) -> Any:
    # A walk of our own rather than dataclasses.asdict, which deep-copies every leaf: the
    # leaves here are JSON scalars, and a submission's to_dict() is on the server's hot path.
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
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
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        one_line = " ".join(str(e).split())
        raise JobSpecError([FieldError(path, f"does not parse: {one_line}")]) from None
    except RecursionError:  # both parsers recurse once per level of nesting
        raise JobSpecError([FieldError(path, "does not parse: it nests lists and mappings "
                                             "deeper than the parser can follow")]) from None
    if not isinstance(data, Mapping):
        raise JobSpecError([FieldError(path, "must hold a mapping of job fields",
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


def _parse(cls: type, data: Any, prefix: str, errors: list[FieldError]) -> Any:
    """Build dataclass `cls` from `data`, checking keys and scalar types; None if it failed."""
    where = prefix.rstrip(".") or "job"
    if not isinstance(data, Mapping):
        errors.append(FieldError(where, "must be a mapping", data))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    n_before = len(errors)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(FieldError(f"{prefix}{key}", f"unknown field{hint}; {where} has "
                                     f"{', '.join(fields)}"))
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        if name not in data:
            if required:
                errors.append(FieldError(path, "is required"))
            continue
        value = data[name]
        if name in _SECTIONS and prefix == "":
            if value is None and name == "scheduler":
                kwargs[name] = None
                continue
            value = _parse(_SECTIONS[name], value, f"{path}.", errors)
        else:
            value = _check_type(path, f.type, value, errors)
        kwargs[name] = value
    if len(errors) > n_before:
        return None
    return cls(**kwargs)


def _check_type(path: str, annotation: str, value: Any, errors: list[FieldError]) -> Any:
    """`value` converted to the field's declared type, or an error."""
    kind = annotation.replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
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
                json.dumps(value, allow_nan=False)
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

def check_name(name: Any) -> FieldError | None:
    """The broken rule of a job's name, or None for a good one.

    Args:
        name: the name as sent (any type).

    Returns:
        A `FieldError` for ``name``, or None.
    """
    if isinstance(name, str) and _NAME_RE.fullmatch(name):
        return None
    return FieldError("name", NAME_RULE, name)


def check_shards(batch_size: int, ranks: int) -> FieldError | None:
    """The broken rule when a global batch cannot be split evenly among `ranks` processes.

    Every rank takes a contiguous ``batch_size / ranks`` of each batch, so the spec's
    ``workers``, ``dptrain run -n`` and the ranks a run starts with are all held to it.

    Args:
        batch_size: the global batch (>= 1).
        ranks: the number of processes (>= 1).

    Returns:
        A `FieldError` for ``batch_size``, or None.
    """
    if batch_size % ranks:
        return FieldError("batch_size", f"must be divisible by the number of ranks ({ranks})",
                          batch_size)
    return None


def model_constructor(name: str) -> Callable[..., Any] | None:
    """The model zoo's constructor for `name`, to check a spec's arguments without building
    the model; None for a user's ``package.module:function``, whose syntax alone is checked.

    Validating a spec never imports a user's module: importing runs its code, and the
    coordinator and the CLI validate every spec they are given. The workers import it when they
    build the model (`build_model`); a module they cannot import fails the job there, once.

    Args:
        name: a zoo name (``mlp``, ``lenet``, ...) or ``package.module:function``.

    Returns:
        The zoo's constructor (a callable taking the model's arguments as keywords), or None.

    Raises:
        ValueError: an unknown zoo name (the message lists the names it knows), or a
            reference that is not ``package.module:function``.
    """
    from dptrain.engine.models import get_constructor, parse_reference

    if ":" in name:
        parse_reference(name)
        return None
    try:
        return get_constructor(name)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e)) from None


def build_model(name: str, args: Mapping[str, Any]) -> Any:
    """Build a model from the zoo.

    Args:
        name: a zoo name or ``package.module:function``.
        args: the constructor's keyword arguments.

    Returns:
        The new ``engine.nn.Module``.
    """
    from dptrain.engine.models import get_model

    return get_model(name, **dict(args))


@functools.lru_cache(maxsize=256)
def _parameters(fn: Callable[..., Any]) -> tuple[inspect.Parameter, ...]:
    """`fn`'s parameters; cached, as `inspect.signature` costs tens of microseconds and every
    submission checks the same few constructors."""
    try:
        return tuple(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return (inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),)


def _check_args(path: str, fn: Callable[..., Any], args: dict[str, Any], what: str,
                skip: tuple[str, ...] = ()) -> list[FieldError]:
    """Errors for keyword arguments that `fn`'s signature does not accept or misses."""
    params = [p for p in _parameters(fn) if p.name not in skip]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    errors = [FieldError(f"{path}.{k}", f"is not an argument of {what} (it takes "
                         f"{', '.join(names) or 'none'})") for k in args if k not in names]
    errors += [FieldError(f"{path}.{p.name}", f"is required by {what}") for p in params
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in args]
    return errors


def _check_scheduler(cls_name: str, scheduler: SchedulerSpec) -> list[FieldError]:
    """Errors of a schedule's arguments: names its class does not take, then the values it
    refuses, found by building it over a throw-away parameter (as the workers will)."""
    from dptrain import engine
    from dptrain.engine.optim import SGD, lr_scheduler

    cls = getattr(lr_scheduler, cls_name)
    errors = _check_args("scheduler.args", cls, scheduler.args,
                         f"scheduler {scheduler.name!r}", skip=("optimizer", "last_epoch"))
    if not errors:
        try:
            cls(SGD([engine.nn.Parameter(engine.zeros(1))], lr=1.0), **scheduler.args)
        except (ValueError, TypeError) as err:
            errors.append(FieldError("scheduler.args", str(err)))
        except ArithmeticError as err:  # e.g. a T_max beyond a double's range
            errors.append(FieldError("scheduler.args", f"cannot make a schedule of these values "
                                     f"({type(err).__name__}: {err})", scheduler.args))
    return errors


def _nonneg(path: str, value: float, errors: list[FieldError]) -> None:
    if not (math.isfinite(value) and value >= 0):
        errors.append(FieldError(path, "must be a finite number >= 0", value))


def validate(spec: JobSpec) -> list[FieldError]:
    """Every rule a well-typed spec breaks.

    Args:
        spec: a spec whose fields have the right types.

    Returns:
        The broken rules, empty when the spec can run.
    """
    from dptrain.worker import data  # the data registry; imported here to keep spec import light

    e: list[FieldError] = []
    if (error := check_name(spec.name)) is not None:
        e.append(error)
    # model
    try:
        ctor = model_constructor(spec.model.name)
    except ValueError as err:
        e.append(FieldError("model.name", str(err)))
    else:
        if ctor is not None:
            e += _check_args("model.args", ctor, spec.model.args, f"model {spec.model.name!r}")
    # dataset
    if spec.dataset.name not in data.DATASETS:
        e.append(FieldError("dataset.name", f"unknown data set (known: "
                            f"{', '.join(sorted(data.DATASETS))})", spec.dataset.name))
    else:
        arg_errors = _check_args("dataset.args", data.DATASETS[spec.dataset.name],
                                 spec.dataset.args, f"data set {spec.dataset.name!r}")
        if not arg_errors and spec.dataset.name == "synthetic":
            arg_errors = [FieldError(f"dataset.args.{name}", rule, value) for name, rule, value
                          in data.synthetic_problems(spec.dataset.args)]
        e += arg_errors
    vf = spec.dataset.validation_fraction
    if not 0.0 <= vf < 1.0:
        e.append(FieldError("dataset.validation_fraction", "must be in [0, 1)", vf))
    # optimizer
    opt = spec.optimizer
    if opt.name not in OPTIMIZERS:
        e.append(FieldError("optimizer.name", f"must be one of {', '.join(OPTIMIZERS)}",
                            opt.name))
    _nonneg("optimizer.lr", opt.lr, e)
    _nonneg("optimizer.weight_decay", opt.weight_decay, e)
    _nonneg("optimizer.momentum", opt.momentum, e)
    _nonneg("optimizer.eps", opt.eps, e)
    for i, beta in enumerate(opt.betas):
        if not 0.0 <= beta < 1.0:
            e.append(FieldError(f"optimizer.betas[{i}]", "must be in [0, 1)", beta))
    if opt.name != "sgd":
        if opt.momentum != 0.0:
            e.append(FieldError("optimizer.momentum", f"applies to sgd only, not {opt.name}",
                                opt.momentum))
        if opt.nesterov:
            e.append(FieldError("optimizer.nesterov", f"applies to sgd only, not {opt.name}",
                                opt.nesterov))
    elif opt.nesterov and opt.momentum <= 0:
        e.append(FieldError("optimizer.nesterov", "needs optimizer.momentum > 0",
                            opt.nesterov))
    # scheduler
    if spec.scheduler is not None:
        cls_name = SCHEDULERS.get(spec.scheduler.name)
        if cls_name is None:
            e.append(FieldError("scheduler.name", f"must be one of {', '.join(SCHEDULERS)}",
                                spec.scheduler.name))
        else:
            e += _check_scheduler(cls_name, spec.scheduler)
    # length of the run and batching
    if spec.batch_size < 1:
        e.append(FieldError("batch_size", "must be >= 1", spec.batch_size))
    elif spec.batch_size > MAX_BATCH_SIZE:
        e.append(FieldError("batch_size", f"must be at most {MAX_BATCH_SIZE} (2**20)",
                            spec.batch_size))
    if spec.workers < 1:
        e.append(FieldError("workers", "must be >= 1", spec.workers))
    elif spec.batch_size >= 1 and (error := check_shards(spec.batch_size, spec.workers)):
        e.append(error)
    if spec.epochs is None and spec.max_steps is None:
        e.append(FieldError("epochs", "epochs or max_steps (or both) must be given"))
    for name in ("epochs", "max_steps"):  # an epoch is at least one step
        value = getattr(spec, name)
        if value is not None and value < 1:
            e.append(FieldError(name, "must be >= 1", value))
        elif value is not None and value > MAX_STEPS:
            e.append(FieldError(name, f"must be at most {MAX_STEPS} (a run of at most 10**9 "
                                "steps)", value))
    for name in ("eval_every", "seed"):
        if getattr(spec, name) < 0:
            e.append(FieldError(name, "must be >= 0", getattr(spec, name)))
    if spec.device not in DEVICES:
        e.append(FieldError("device", f"must be one of {', '.join(DEVICES)}", spec.device))
    if spec.checkpoint.every_steps < 0:
        e.append(FieldError("checkpoint.every_steps", "must be >= 0 (0: only at the end)",
                            spec.checkpoint.every_steps))
    if spec.checkpoint.keep < 1:
        e.append(FieldError("checkpoint.keep", "must be >= 1", spec.checkpoint.keep))
    return e


def trajectory_differences(saved: Mapping[str, Any], spec: JobSpec) -> list[str]:
    """The fields whose change would make a resumed run differ from an uninterrupted one.

    ``name``, ``epochs``, ``max_steps``, ``eval_every``, ``workers`` and ``checkpoint`` may
    change between a checkpoint and its resumption; everything else must not.

    Args:
        saved: the spec (as `JobSpec.to_dict` gave it) recorded in a checkpoint.
        spec: the spec of the run that resumes.

    Returns:
        Dotted paths of the fields that differ, empty when the run can resume exactly.
    """
    free = {"name", "epochs", "max_steps", "eval_every", "workers", "checkpoint"}
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
