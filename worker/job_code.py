"""A job's own code on a rank: the directory put first on ``sys.path``, and the spec's
``package.module:function`` references for the loss and the data set resolved from it.

Only the workers import a job's code (importing runs it); the coordinator and the CLI check
the references' syntax alone (`dptrain.worker.spec`). Every rank puts the same directory first
on its path, whoever started it (``dptrain run``, ``mpiexec ... -m dptrain.worker`` or the
coordinator): the job file's directory, or its ``code:`` directory relative to the job file.
Errors name the spec field, e.g. ``loss: loss 'mylosses:focal': cannot import module
'mylosses': No module named 'mylosses'``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dptrain.worker.code_archive import CodeArchiveError
from dptrain.worker.data import ArrayDataset, DataError, Dataset
from dptrain.worker.environment import COORDINATOR
from dptrain.worker.events import fetch_code
from dptrain.worker.spec import code_digest
from dptrain.worker.spec_errors import FieldError, JobSpecError

__all__ = ["code_directory", "put_first_on_path", "resolve_loss", "load_user_dataset",
           "IndexableDataset"]


def code_directory(job_file: str | os.PathLike, code: str | None) -> str:
    """The directory a job's own modules are imported from.

    Args:
        job_file: the job file the rank reads.
        code: the spec's ``code`` (relative to the job file's directory), or None.

    Returns:
        The absolute directory: ``code`` resolved, else the job file's directory. Code a
        coordinator stores (``code: "sha256:<digest>"``) is fetched from it, verified and
        unpacked into ``code/<digest>/`` beside the job file, once per host (restarts find
        it there).

    Raises:
        JobSpecError: naming ``code`` when that directory does not exist, when the code
            is a coordinator's and no coordinator is set (``DPTRAIN_COORDINATOR``), or when
            the fetched archive fails its sha256 or is unsafe (``CodeArchiveError``).
        Exception: the fetch failed (the plug-in's errors, e.g. the coordinator unreachable).
    """
    base = os.path.dirname(os.path.abspath(os.fspath(job_file)))
    digest = code_digest(code)
    if digest is not None:
        target = os.path.join(base, "code", digest)
        if not os.path.isdir(target):
            if not os.environ.get(COORDINATOR):
                raise JobSpecError([FieldError("code", "names code stored on a coordinator, "
                                               f"which only its workers can fetch ({COORDINATOR}"
                                               " is not set)", code)])
            try:
                fetch_code(digest, target, os.environ)
            except CodeArchiveError as e:  # damaged or unsafe: every launch would fail alike
                raise JobSpecError([FieldError("code", str(e), code)]) from None
        return target
    directory = os.path.normpath(os.path.join(base, code)) if code else base
    if not os.path.isdir(directory):
        raise JobSpecError([FieldError("code", "must be a directory (relative to the job "
                                               f"file's, {base})", code)])
    return directory


def put_first_on_path(directory: str) -> None:
    """Make `directory` the first place ``import`` looks (once, however often called)."""
    if directory in sys.path:
        sys.path.remove(directory)
    sys.path.insert(0, directory)


def _import(reference: str, what: str, field: str) -> Callable[..., Any]:
    from dptrain.engine.models import import_reference

    try:
        return import_reference(reference, what)
    except (ValueError, TypeError) as e:
        raise JobSpecError([FieldError(field, str(e))]) from None


def resolve_loss(reference: str) -> Callable[..., Any]:
    """The spec's ``loss``: a function ``loss(output, target) -> scalar Tensor``.

    Args:
        reference: ``package.module:function``.

    Returns:
        The function.

    Raises:
        JobSpecError: naming ``loss`` when it cannot be imported or is not callable.
    """
    return _import(reference, "loss", "loss")


class IndexableDataset(Dataset):
    """A user's indexable data set (``len(ds)`` and ``ds[i] -> (x, y)``, as PyTorch's) in the
    batch-gathering form the loop and the sampler use.

    Args:
        items: the indexable data set.
        task: one of ``classification``, ``regression``, ``tokens``; None infers it from the
            first sample as `ArrayDataset` does.
    """

    def __init__(self, items: Any, task: str | None = None):
        self.items = items
        if len(items) == 0:
            raise DataError("the data set is empty")
        x, y = (np.asarray(v) for v in items[0])
        probe = ArrayDataset(x[None], y[None], task)
        self.task, self.scale = probe.task, probe.scale
        self.num_classes = getattr(items, "num_classes", None)

    def __len__(self) -> int:
        return len(self.items)

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.items[int(i)] for i in indices]
        x = np.stack([np.asarray(p[0]) for p in pairs])
        y = np.stack([np.asarray(p[1]) for p in pairs])
        return ArrayDataset(x, y, self.task, num_classes=1).gather(np.arange(len(x)))


def _as_dataset(value: Any, reference: str) -> Dataset:
    if isinstance(value, Dataset):
        return value
    if isinstance(value, Sequence) and len(value) == 2 and all(
            hasattr(v, "__len__") and not isinstance(v, (str, bytes)) for v in value):
        try:
            return ArrayDataset(np.asarray(value[0]), np.asarray(value[1]))
        except DataError as e:
            raise DataError(f"data set {reference!r}: {e}") from None
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return IndexableDataset(value)
    raise DataError(f"data set {reference!r} returned a {type(value).__name__}; return "
                    "arrays (x, y), a dptrain Dataset, or an indexable data set of (x, y) "
                    "pairs")


def load_user_dataset(reference: str, args: dict[str, Any]) -> Dataset:
    """Call the spec's ``dataset.name`` reference with ``dataset.args``.

    Args:
        reference: ``package.module:function``.
        args: its keyword arguments.

    Returns:
        A `Dataset`: what the function returned, arrays ``(x, y)`` or an indexable data set.

    Raises:
        JobSpecError: naming ``dataset.name`` when it cannot be imported or is not callable.
        DataError: it failed, or returned something that is not a data set.
    """
    fn = _import(reference, "data set", "dataset.name")
    try:
        value = fn(**args)
    except (TypeError, ValueError) as e:
        raise DataError(f"data set {reference!r}: {type(e).__name__}: {e}") from None
    return _as_dataset(value, reference)
