"""Every error the coordinator's core raises, each with the gRPC status a servicer maps it to.

One module so the servicer turns errors into ``context.abort(code, str(error))`` in one place
(``STATUS`` below) without importing grpc here: the codes are the names of ``grpc.StatusCode``
members. Each message is one readable line that names the field, the rule and the value.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from dptrain.worker.hostfile import HostfileError  # parsed in the worker, for `dptrain run` too
from dptrain.worker.spec_errors import cut, echo

if TYPE_CHECKING:
    from dptrain.coordinator.api.records import JobState

__all__ = [
    "CoordinatorError", "ValidationError", "OutOfRange", "InvalidTransition", "StoreError",
    "NotFound", "JobNotFound", "CheckpointNotFound", "AlreadyExists", "StateConflict",
    "StoreClosed", "SchemaError", "CorruptRecord", "BlobError", "BlobNotFound", "BlobCorrupted",
    "ChecksumMismatch", "BlobTooLarge", "DiskFull", "HostfileError", "UserNotFound",
    "Unauthenticated", "PermissionDenied", "STATUS", "status_name",
]


class CoordinatorError(Exception):
    """Base of the coordinator core's errors."""


class ValidationError(CoordinatorError, ValueError):
    """Bad input: names the field, the rule it broke and the value (INVALID_ARGUMENT).

    Args:
        field: the field's name or dotted path, e.g. ``workers``.
        rule: what the value must be, e.g. ``must be >= 1``.
        value: the offending value.
    """

    def __init__(self, field: str, rule: str, value: Any):
        self.field, self.rule, self.value = field, rule, value
        # The path (it may quote a key) and the value are cut, never the rule.
        super().__init__(f"{cut(field)}: {rule}, got {echo(value)}")


class OutOfRange(ValidationError):
    """A position beyond the end of what it points into, e.g. a download's offset past the
    file's size (OUT_OF_RANGE); the message names the field, the rule and the value."""


class InvalidTransition(CoordinatorError, ValueError):
    """A state change the state machine forbids, e.g. SUCCEEDED -> RUNNING (FAILED_PRECONDITION).

    Args:
        current: the job's state.
        target: the state asked for.
        allowed: the states `current` may move to.
    """

    def __init__(self, current: JobState, target: JobState, allowed: Collection[JobState]):
        self.current, self.target = current, target
        names = ", ".join(sorted(s.value for s in allowed)) or "none, it is terminal"
        super().__init__(f"job state: cannot go from {current.value} to {target.value} "
                         f"(allowed from {current.value}: {names})")


class StoreError(CoordinatorError):
    """Base of the store's errors."""


class NotFound(StoreError, LookupError):
    """No such job or checkpoint (NOT_FOUND)."""


class JobNotFound(NotFound):
    """No job with this id (NOT_FOUND).

    Args:
        job_id: the id asked for.
    """

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found")


class CheckpointNotFound(NotFound):
    """The job has no checkpoint at this step, or none at all when ``step`` is None (NOT_FOUND).

    Args:
        job_id: the job.
        step: the step asked for; None for "the latest".
    """

    def __init__(self, job_id: str, step: int | None):
        self.job_id, self.step = job_id, step
        what = "no checkpoints" if step is None else f"no checkpoint at step {step}"
        super().__init__(f"job {job_id!r} has {what}")


class UserNotFound(NotFound):
    """No user with this name (NOT_FOUND).

    Args:
        name: the name asked for.
    """

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"user {name!r} not found (dptrain user list shows the users)")


class Unauthenticated(CoordinatorError):
    """No token, or one that is not valid: unknown, revoked or replaced (UNAUTHENTICATED)."""


class PermissionDenied(CoordinatorError):
    """A valid token used beyond its rights; the message names the rule (PERMISSION_DENIED)."""


class AlreadyExists(StoreError):
    """A job id, or a different checkpoint at a (job, step), already stored (ALREADY_EXISTS)."""


class StateConflict(StoreError):
    """The job is not in a state the operation requires (FAILED_PRECONDITION).

    Args:
        job_id: the job.
        actual: its state.
        expected: the states the caller required.
    """

    def __init__(self, job_id: str, actual: JobState, expected: Collection[JobState]):
        self.job_id, self.actual, self.expected = job_id, actual, frozenset(expected)
        names = ", ".join(sorted(s.value for s in self.expected))
        super().__init__(f"job {job_id!r} is {actual.value}, expected one of: {names}")


class StoreClosed(StoreError):
    """The store was closed (UNAVAILABLE: the server is shutting down)."""


class SchemaError(StoreError):
    """The database's schema cannot be used by this version of dptrain (startup error)."""


class CorruptRecord(StoreError):
    """A stored record that cannot be read back, e.g. a column that no longer parses (DATA_LOSS).

    Args:
        what: the record, e.g. ``job 'j-0123456789ab'``.
        reason: why it cannot be read.
    """

    def __init__(self, what: str, reason: BaseException | str):
        self.what = what
        super().__init__(f"{what}: the stored record cannot be read ({reason})")


class BlobError(CoordinatorError):
    """Base of the blob store's errors."""


class BlobNotFound(BlobError, LookupError):
    """No blob with this name (NOT_FOUND; for a checkpoint: fall back to the previous one).

    Args:
        sha256: the blob's name asked for (``server.blobs.blob_id``: a sha256, or an
            algorithm-prefixed digest such as ``blake3:…``).
    """

    def __init__(self, sha256: str):
        self.sha256 = sha256
        super().__init__(f"blob {sha256} not found")


class BlobCorrupted(BlobError):
    """A stored blob whose content no longer hashes to its name (DATA_LOSS; fall back).

    Args:
        sha256: the name the blob is stored under (``server.blobs.blob_id``).
        actual: what its bytes hash to now.
        size: how many bytes were read.
    """

    def __init__(self, sha256: str, actual: str, size: int):
        self.sha256, self.actual, self.size = sha256, actual, size
        super().__init__(f"blob {sha256} is corrupted: its {size} bytes hash to {actual}")


class ChecksumMismatch(BlobError, ValueError):
    """Uploaded bytes that do not hash to the digest the sender declared (DATA_LOSS).

    Args:
        expected: the declared digest.
        actual: the digest of the bytes received.
        size: how many bytes were received.
    """

    def __init__(self, expected: str, actual: str, size: int):
        self.expected, self.actual, self.size = expected, actual, size
        super().__init__(f"checksum: the {size} bytes received hash to {actual}, "
                         f"not the declared {expected}; nothing was stored")


class BlobTooLarge(BlobError, ValueError):
    """An upload over the store's size limit (RESOURCE_EXHAUSTED); nothing is stored.

    Args:
        limit: the limit in bytes.
    """

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"size: a blob may hold at most {limit} bytes; nothing was stored")


class DiskFull(CoordinatorError):
    """The coordinator's disk has no room for what it was asked to store (RESOURCE_EXHAUSTED);
    nothing was stored and what was stored before is intact.

    Args:
        where: the directory (or database) that is full.
        needed: the bytes the write needed, when known.
    """

    def __init__(self, where: str, needed: int | None = None):
        self.where, self.needed = where, needed
        what = "" if needed is None else f": {needed} bytes needed"
        super().__init__(f"coordinator disk full under {where}{what}; nothing was stored "
                         "(free space there, then retry)")


#: Error class -> the name of the ``grpc.StatusCode`` a servicer aborts with. Look it up with
#: `status_name`, which walks the class's bases, so subclasses inherit their parent's code.
STATUS: dict[type[BaseException], str] = {
    ValidationError: "INVALID_ARGUMENT",
    OutOfRange: "OUT_OF_RANGE",
    HostfileError: "INVALID_ARGUMENT",
    InvalidTransition: "FAILED_PRECONDITION",
    StateConflict: "FAILED_PRECONDITION",
    NotFound: "NOT_FOUND",
    BlobNotFound: "NOT_FOUND",
    AlreadyExists: "ALREADY_EXISTS",
    StoreClosed: "UNAVAILABLE",
    CorruptRecord: "DATA_LOSS",
    BlobCorrupted: "DATA_LOSS",
    ChecksumMismatch: "DATA_LOSS",
    BlobTooLarge: "RESOURCE_EXHAUSTED",
    DiskFull: "RESOURCE_EXHAUSTED",
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
}


def status_name(error: BaseException) -> str:
    """The ``grpc.StatusCode`` name for an error: ``getattr(grpc.StatusCode, status_name(e))``.

    Args:
        error: any exception.

    Returns:
        The code of the nearest class in `STATUS` along the error's MRO, else ``"INTERNAL"``.
    """
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return "INTERNAL"
