"""What the code RPCs do, as plain functions of ``(request, state)``: a job's own code stored
with the blobs, content-addressed, and handed to the job's workers.

An upload (`receive_code`, any user's token: `server.access` says so) streams
into the blob store under the sha256 its header declares; bytes that hash otherwise, more than
``state.max_code_bytes``, or an archive that is not a safe code archive
(``worker.code_archive.check_archive``: no absolute names, ``..``, links or devices) store
nothing. A job names the archive as ``code: "sha256:<digest>"`` (checked at submission,
``jobs.check_code``); its workers fetch it (`open_code`) on every launch, so restarts and recoveries
use the same code. Code blobs count as referenced while a job names them
(``checkpoint_store.referenced_blobs``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from dptrain.coordinator.api.errors import (
    BlobNotFound,
    BlobTooLarge,
    ChecksumMismatch,
    NotFound,
    StateConflict,
    ValidationError,
)
from dptrain.coordinator.server.blobs import LeasedStream, blob_id
from dptrain.coordinator.server.checkpoint_store import WORKER_STATES
from dptrain.coordinator.server.code_listing import write_listing
from dptrain.coordinator.server.jobs import ServiceState
from dptrain.worker.code_archive import CodeArchiveError, check_archive
from dptrain.worker.spec import code_digest

__all__ = ["CodeNotFound", "receive_code", "open_code"]

_CHUNK = 1 << 20


class CodeNotFound(NotFound):
    """A job without shipped code, or code no upload stored (NOT_FOUND)."""


def _limited(chunks: Iterable[bytes], limit: int) -> Iterator[bytes]:
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BlobTooLarge(limit)
        yield chunk


def receive_code(sha256: str, size: int, chunks: Iterable[bytes],
                 state: ServiceState) -> tuple[str, int]:
    """Store an uploaded code archive.

    Args:
        sha256: the digest the header declares.
        size: the size it declares.
        chunks: the archive's bytes.
        state: the server.

    Returns:
        ``(sha256, size)`` as stored.

    Raises:
        ValidationError: a bad digest, bytes that do not match it, or an unsafe archive
            (INVALID_ARGUMENT); nothing is stored.
        BlobTooLarge: more than ``state.max_code_bytes`` (RESOURCE_EXHAUSTED).
        DiskFull: no room left in the blob store (RESOURCE_EXHAUSTED); nothing is stored.
    """
    expected = blob_id("sha256", sha256, "header.sha256")  # code archives are named by sha256
    limit = state.max_code_bytes
    if size > limit:
        raise BlobTooLarge(limit)
    try:
        stored, stored_size = state.blobs.put(_limited(chunks, limit), expected=expected,
                                              size=size)
    except ChecksumMismatch as e:  # nothing was stored
        raise ValidationError("header.sha256", f"does not match the bytes sent ({e})",
                              sha256) from None
    # An unsafe archive is deleted again: no job can name it (check_archive is deterministic,
    # and a job may name only an archive that passed it).
    try:
        files = check_archive(state.blobs.get(stored), limit)
    except CodeArchiveError as e:
        state.blobs.delete(stored)
        if "limit" in str(e):
            raise BlobTooLarge(limit) from None
        raise ValidationError("code", f"the archive is refused: {e}",
                              f"{stored_size} bytes") from None
    write_listing(state.code_listings, stored, files)  # what submissions naming it read
    return stored, stored_size


def open_code(job_id: str, state: ServiceState) -> tuple[str, int, Iterator[bytes]]:
    """The code of a job whose workers run now, to send them.

    Returns:
        ``(sha256, size, chunks)``; the chunks are not hashed here: the worker hashes what it
        receives and refuses an archive that fails the sha256 (``WorkerClient.fetch_code``),
        the one check that counts, so the bytes are hashed once, not twice.

    Raises:
        JobNotFound: no such job.
        StateConflict: the job is over (FAILED_PRECONDITION).
        CodeNotFound: the job ships no code, or its archive is gone.
    """
    job = state.store.get_job(job_id)
    if job.state not in WORKER_STATES:
        raise StateConflict(job_id, job.state, WORKER_STATES)
    digest = code_digest(job.spec.get("code"))
    if digest is None:
        raise CodeNotFound(f"job {job_id!r} has no uploaded code")
    lease = state.blobs.lease([digest])  # held until the stream ends (server.blobs)
    try:
        size, chunks = state.blobs.size(digest), state.blobs.read(digest, chunk_size=_CHUNK,
                                                              verify=False)
    except BlobNotFound:
        lease.release()
        raise CodeNotFound(f"job {job_id!r} has no uploaded code") from None
    return digest, size, LeasedStream(lease, chunks)
