"""The rules of a job spec, each written once: what `JobSpec.from_dict` checks after the
fields' types (`dptrain.worker.spec`), and the rules the coordinator and ``dptrain run`` apply
to a spec on their own (`check_name`, `check_shards`, `code_digest`).

Validating a spec never imports a user's module (`model_constructor`): the model zoo, the
data registry and the schedules are imported on first use, to keep importing the spec light.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from dptrain.worker.spec_errors import FieldError

if TYPE_CHECKING:
    from dptrain.worker.spec import JobSpec, SchedulerSpec

__all__ = [
    "OPTIMIZERS", "SCHEDULERS", "DEVICES", "ALLREDUCE_PATHS", "ALLREDUCE_CHOICES",
    "SHARED_MEMORY", "MPI_ALLREDUCE", "CPU_ALLREDUCE", "MAX_BATCH_SIZE", "MAX_STEPS",
    "NAME_RULE",
    "CODE_DIGEST_PREFIX", "check_name", "check_shards", "model_constructor", "build_model",
    "validate", "code_digest",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
# Spec name -> engine.optim.lr_scheduler class name; stepped once per training step.
SCHEDULERS = {"step": "StepLR", "cosine": "CosineAnnealingLR", "linear": "LinearLR"}
DEVICES = ("cpu", "cuda", "auto")  # auto: cuda where CuPy sees a GPU, else cpu
# How DDP reduces gradient buckets on a GPU (dptrain.worker.comm_device): auto picks nccl when
# every rank has a GPU of its own, else cuda_aware where MPI reads GPU memory, else host.
ALLREDUCE_PATHS = ("auto", "host", "cuda_aware", "nccl")
# And for CPU gradients: summed in an MPI-3 shared window when every rank is on one node
# (dptrain.worker.comm_hooks.SharedMemoryAllreduce; what auto picks where /dev/shm has room),
# or MPI's all-reduce.
SHARED_MEMORY = "shared_memory"
MPI_ALLREDUCE = "mpi"
CPU_ALLREDUCE = (SHARED_MEMORY, MPI_ALLREDUCE)
ALLREDUCE_CHOICES = (*ALLREDUCE_PATHS, *CPU_ALLREDUCE)
MAX_BATCH_SIZE = 2**20
"""The largest global ``batch_size`` (a million samples per step)."""
MAX_STEPS = 10**9
"""The most optimizer steps a run may take (``max_steps``; ``epochs`` as the workers count
them): more could only run until someone cancels it."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = ("must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a "
             "letter or digit")
"""What a job's name must be (the one statement of the rule; `check_name` applies it)."""


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
    e: list[FieldError] = []
    if (error := check_name(spec.name)) is not None:
        e.append(error)
    if spec.entrypoint is not None:
        return e + _entrypoint_errors(spec)
    missing = [FieldError(name, "is required (or give an entrypoint: your own training script)")
               for name in _DECLARATIVE_REQUIRED if getattr(spec, name) is None]
    return e + (missing or _declarative_errors(spec))


#: What a declarative job must give (an entrypoint job gives none of it).
_DECLARATIVE_REQUIRED = ("model", "dataset", "optimizer", "batch_size")
#: What only the declarative loop reads (an entrypoint job must leave it out).
_DECLARATIVE_ONLY = (*_DECLARATIVE_REQUIRED, "epochs", "max_steps", "scheduler", "loss")


def _entrypoint_errors(spec: JobSpec) -> list[FieldError]:
    """The broken rules of a job that runs its own training script."""
    import shlex

    e = [FieldError(name, "does not apply to an entrypoint job (the script trains)",
                    getattr(spec, name)) for name in _DECLARATIVE_ONLY
         if getattr(spec, name) is not None]
    try:
        words = shlex.split(spec.entrypoint)
    except ValueError as err:
        words, problem = [], f"must split into a script and its arguments ({err})"
    else:
        problem = "must name a script (relative to the code directory) and its arguments"
    if not words or os.path.isabs(words[0]) or "\0" in spec.entrypoint:
        e.append(FieldError("entrypoint", problem, spec.entrypoint))
    if spec.eval_every != 0:
        e.append(FieldError("eval_every", "does not apply to an entrypoint job (the script "
                            "trains)", spec.eval_every))
    return e + _common_errors(spec)


def _declarative_errors(spec: JobSpec) -> list[FieldError]:
    """The broken rules of a job the declarative loop trains (`dptrain.worker.train`)."""
    from dptrain.worker import data  # the data registry; imported here to keep spec import light

    e: list[FieldError] = []
    # model
    try:
        ctor = model_constructor(spec.model.name)
    except ValueError as err:
        e.append(FieldError("model.name", str(err)))
    else:
        if ctor is not None:
            e += _check_args("model.args", ctor, spec.model.args, f"model {spec.model.name!r}")
    # dataset
    if ":" in spec.dataset.name:
        e += _reference_errors("dataset.name", spec.dataset.name, "data set")
    elif spec.dataset.name not in data.DATASETS:
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
    if spec.workers >= 1 and spec.batch_size >= 1 and (
            error := check_shards(spec.batch_size, spec.workers)):
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
    if spec.eval_every < 0:
        e.append(FieldError("eval_every", "must be >= 0", spec.eval_every))
    if spec.loss is not None:
        e += _reference_errors("loss", spec.loss, "loss")
    return e + _common_errors(spec)


def _common_errors(spec: JobSpec) -> list[FieldError]:
    """The rules of the fields every job has, declarative or not."""
    e: list[FieldError] = []
    if spec.workers < 1:
        e.append(FieldError("workers", "must be >= 1", spec.workers))
    if spec.seed < 0:
        e.append(FieldError("seed", "must be >= 0", spec.seed))
    if spec.device not in DEVICES:
        e.append(FieldError("device", f"must be one of {', '.join(DEVICES)}", spec.device))
    if spec.allreduce not in ALLREDUCE_CHOICES:
        e.append(FieldError("allreduce", f"must be one of {', '.join(ALLREDUCE_CHOICES)}",
                            spec.allreduce))
    elif spec.allreduce in CPU_ALLREDUCE and spec.device != "cpu":
        e.append(FieldError("allreduce", "chooses how CPU gradients are reduced: it needs "
                            "device cpu", spec.allreduce))
    elif spec.allreduce not in ("auto", *CPU_ALLREDUCE) and spec.device == "cpu":
        e.append(FieldError("allreduce", "chooses how GPU gradients are reduced: it needs "
                            "device cuda or auto (CPU gradients: auto, shared_memory or mpi)",
                            spec.allreduce))
    if spec.checkpoint.every_steps < 0:
        e.append(FieldError("checkpoint.every_steps", "must be >= 0 (0: only at the end)",
                            spec.checkpoint.every_steps))
    if spec.checkpoint.keep < 1:
        e.append(FieldError("checkpoint.keep", "must be >= 1", spec.checkpoint.keep))
    if spec.code is not None and spec.code.startswith(CODE_DIGEST_PREFIX):
        if not _DIGEST_RE.fullmatch(spec.code[len(CODE_DIGEST_PREFIX):]):
            e.append(FieldError("code", "must be 'sha256:' and 64 lowercase hex digits (an "
                                "uploaded archive), or a directory", spec.code))
    elif spec.code is not None and (not spec.code.strip() or os.path.isabs(spec.code)
                                    or "\0" in spec.code):
        e.append(FieldError("code", "must be a directory relative to the job file", spec.code))
    return e


CODE_DIGEST_PREFIX = "sha256:"
"""How a job sent to a coordinator names its uploaded code: ``code: "sha256:<digest>"``."""
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def code_digest(code: str | None) -> str | None:
    """The sha256 of the uploaded archive a spec's ``code`` names; None for a directory or none.

    Example:
        >>> code_digest("sha256:" + "ab" * 32) == "ab" * 32, code_digest("src")
        (True, None)
    """
    if isinstance(code, str) and code.startswith(CODE_DIGEST_PREFIX):
        return code[len(CODE_DIGEST_PREFIX):]
    return None


def _reference_errors(path: str, name: str, what: str) -> list[FieldError]:
    """The syntax error of a ``package.module:function`` reference, if any (nothing is
    imported: the workers do that, `dptrain.worker.job_code`)."""
    from dptrain.engine.models import parse_reference

    try:
        parse_reference(name, what)
    except ValueError as err:
        return [FieldError(path, str(err))]
    return []
