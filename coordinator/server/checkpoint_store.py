"""What the checkpoint RPCs do, as plain functions of ``(request, state)``: no grpc here.

A worker checkpoint is a directory: ``model.safetensors``, ``optimizer.safetensors`` and
``manifest.json``, which lists every other file's size and digest, BLAKE3 (or sha256 in
checkpoints written before; ``worker/checkpoint_manifest.py``, the format's one owner).
The coordinator stores each file as a content-addressed blob (`server.blobs.BlobStore`),
so the manifest's digest of a file *is* the name of its blob (`server.blobs.blob_id`), and
records a `CheckpointRecord` whose ``sha256`` names the ``manifest.json`` blob, whose ``size``
is the total of all the files, and whose ``manifest`` is the parsed manifest
(``files: {name: {blake3 or sha256, bytes}}``).

Each file is hashed once per side of a transfer: an upload as the blob store writes it (the
blob becomes visible only if it matches), a download by its receiver (the client, or a
resuming worker), which keeps nothing that fails; the server streams a download without
hashing it again.

A checkpoint is intact when every one of its blobs is present and hashes to its name; resuming
(`open_fetch`) skips damaged ones, newest first (`intact_checkpoint`). Retention
(`prune_job_checkpoints`) keeps a job's newest ``checkpoint.keep`` records and those marked
kept (`keep_checkpoint`), and deletes the blobs no remaining record refers to (`free_blobs`).
`referenced_blobs` is the one definition of which blobs are in use — every record's manifest
blob and every file blob its manifest lists, and every job's code archive — for retention,
deleting jobs (`server.retention`) and ``BlobStore.collect_garbage`` alike.

Who may store a checkpoint when. A job's workers upload while their attempt lives: while the
job is RUNNING, while it is CANCELLING (a user cancelled it: the checkpoint its workers write
while stopping is kept) and while it is RESTARTING (the runner ended the attempt, whose SIGTERM
checkpoint is still welcome); once the job is terminal its workers' token is dead and an upload
stores nothing (`WORKER_STATES`, checked again in the transaction that records it). The runner
stores what the workers could not upload from the job's checkpoint directory
(`server.ingest`), through the same `store_checkpoint`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.coordinator.api.checkpoint_upload import CheckpointUpload, record_files
from dptrain.coordinator.api.errors import (
    AlreadyExists,
    BlobCorrupted,
    BlobNotFound,
    CheckpointNotFound,
    CoordinatorError,
    DiskFull,
    OutOfRange,
    StateConflict,
    ValidationError,
)
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.api.records import (
    HOLDING_STATES,
    CheckpointRecord,
    EventKind,
    Job,
    JobState,
)
from dptrain.coordinator.server.blobs import BlobLease, BlobStore, LeasedStream, blob_id
from dptrain.coordinator.server.checkpoint_header import check_upload_header
from dptrain.coordinator.server.jobs import fail_job
from dptrain.worker.checkpoint_manifest import MANIFEST, FileEntry
from dptrain.worker.spec import code_digest

if TYPE_CHECKING:
    from dptrain.coordinator.server.jobs import ServiceState
    from dptrain.coordinator.server.store import Store

__all__ = [
    "DEFAULT_FILE", "WORKER_STATES", "record_blobs", "store_checkpoint",
    "receive_checkpoint", "list_checkpoints", "verify_record", "intact_checkpoint",
    "open_download", "locate_download", "DownloadPlace", "check_worker_upload", "open_fetch",
    "locate_fetch", "FetchPlace",
    "keep_checkpoint", "prune_job_checkpoints", "free_blobs",
    "referenced_blobs",
]

log = logging.getLogger("dptrain.coordinator")

DEFAULT_FILE = "model.safetensors"
#: The job states in which its workers may upload and fetch checkpoints (see the docstring):
#: CANCELLING too, so that the checkpoint a cancelled job writes while stopping is kept.
WORKER_STATES = HOLDING_STATES | {JobState.RESTARTING}


def record_blobs(record: CheckpointRecord) -> dict[str, str]:
    """File name -> blob name for every file of a checkpoint, ``manifest.json`` included."""
    return {MANIFEST: record.sha256,
            **{f.name: blob_id(f.algorithm, f.digest) for f in record_files(record)}}


# ---------------------------------------------------------------- upload

class _Peekable:
    """An iterator of ``(name, data)`` chunks whose next chunk can be looked at first."""

    def __init__(self, chunks: Iterable[tuple[str, bytes]]):
        self._it = iter(chunks)
        self._next: tuple[str, bytes] | None = None
        self._done = False

    def peek(self) -> tuple[str, bytes] | None:
        if self._next is None and not self._done:
            self._next = next(self._it, None)
            self._done = self._next is None
        return self._next

    def take(self) -> tuple[str, bytes]:
        item = self.peek()
        assert item is not None
        self._next = None
        return item


def _file_chunks(chunks: _Peekable, name: str, counter: list[int]) -> Iterator[bytes]:
    while (item := chunks.peek()) is not None and item[0] == name:
        data = chunks.take()[1]
        counter[0] += len(data)
        yield data


def store_checkpoint(upload: CheckpointUpload, chunks: Iterable[tuple[str, bytes]],
                     store: Store, blobs: BlobStore, *, states: Iterable[JobState] | None = None,
                     now: float | None = None) -> tuple[CheckpointRecord, int]:
    """Store a checkpoint: every file as a verified blob, then its record.

    The record (and its ``checkpoint`` event) is written only after every blob is stored, so
    a broken upload leaves no checkpoint. A different checkpoint already stored at the same
    step (a run resumed and wrote that step again) is replaced. Then retention runs.

    Args:
        upload: the header.
        chunks: ``(file name, bytes)`` in the header's file order, each file's chunks together.
        store: the records.
        blobs: the files.
        states: when given, store it only while the job is in one of these states (checked
            before any byte is stored, and again when the record is written).
        now: the record's time (default: the clock).

    Returns:
        ``(record, bytes received)``.

    Raises:
        JobNotFound: no such job.
        StateConflict: the job is not in one of `states`.
        ValidationError: a header that contradicts its manifest, or chunks out of order.
        ChecksumMismatch: a file's bytes do not match its digest (DATA_LOSS).
        BlobTooLarge: a file larger than the server allows (RESOURCE_EXHAUSTED).
        DiskFull: no room for a file or the record (RESOURCE_EXHAUSTED); no record is
            written, the stored checkpoints are as they were.
    """
    job, manifest = _check_before_bytes(upload, store, blobs, states)
    # Pinned until recorded: retention elsewhere may be freeing the same bytes meanwhile.
    names = [blob_id(f.algorithm, f.digest) for f in upload.files]
    with blobs.lease([*names, hashlib.sha256(upload.manifest_json).hexdigest()], pin=True):
        record, received = _store_files(upload, chunks, manifest, store, blobs, states, now)
    keep = (job.spec.get("checkpoint") or {}).get("keep", 3)
    prune_job_checkpoints(store, blobs, upload.job_id, keep)
    return record, received + len(upload.manifest_json)


def _store_files(upload: CheckpointUpload, chunks: Iterable[tuple[str, bytes]],
                 manifest: dict[str, Any], store: Store, blobs: BlobStore,
                 states: Iterable[JobState] | None, now: float | None
                 ) -> tuple[CheckpointRecord, int]:
    """`store_checkpoint`'s blobs, then its record; returns the record and the bytes of the
    files received (the manifest's not counted)."""
    stream = _Peekable(chunks)
    received = [0]
    total = len(upload.manifest_json) + sum(f.size for f in upload.files)
    for entry in upload.files:
        head = stream.peek()
        if entry.size and (head is None or head[0] != entry.name):
            raise ValidationError("chunk.name", f"expected the bytes of {entry.name}",
                                  None if head is None else head[0])
        _, size = blobs.put(_file_chunks(stream, entry.name, received),
                            expected=blob_id(entry.algorithm, entry.digest), size=total)
        if size != entry.size:  # the digest matched, so the declared size was wrong
            raise ValidationError(f"header.files.{entry.name}.size",
                                  f"must be the file's size ({size})", entry.size)
    if stream.peek() is not None:
        raise ValidationError("chunk.name", "must name a file of the header, in order",
                              stream.peek()[0])
    manifest_sha, _ = blobs.put(upload.manifest_json, size=total)
    record = CheckpointRecord(upload.job_id, upload.step, manifest_sha, total,
                              time.time() if now is None else now, manifest)
    try:
        record = store.add_checkpoint(record, states=states)
    except AlreadyExists:
        store.delete_checkpoint(upload.job_id, upload.step)
        record = store.add_checkpoint(record, states=states)
    return record, received[0]


def check_worker_upload(upload: CheckpointUpload, state: ServiceState) -> None:
    """Every check `receive_checkpoint` makes before the first byte: the job is in
    `WORKER_STATES`, the header agrees with its manifest, no file is too large (an upload
    over the data port is refused with these errors before its bytes travel).

    Raises:
        JobNotFound, StateConflict, ValidationError, BlobTooLarge: as `receive_checkpoint`.
    """
    _check_before_bytes(upload, state.store, state.blobs, WORKER_STATES)


def _check_before_bytes(upload: CheckpointUpload, store: Store, blobs: BlobStore,
                        states: Iterable[JobState] | None) -> tuple[Job, dict[str, Any]]:
    """The job (in one of `states`, when given) and the parsed manifest of a header that
    passed `check_upload_header`: what an upload is checked against before any byte."""
    job = store.get_job(upload.job_id)
    if states is not None and job.state not in states:
        raise StateConflict(job.id, job.state, states)
    return job, check_upload_header(upload, blobs.max_size)


def receive_checkpoint(upload: CheckpointUpload, chunks: Iterable[tuple[str, bytes]],
                       state: ServiceState, *, now: float | None = None) -> CheckpointRecord:
    """Store a checkpoint a job's workers upload (`store_checkpoint`), while their attempt
    lives: the job must be in `WORKER_STATES`.

    Args:
        upload: the header.
        chunks: ``(file name, bytes)`` in the header's file order, each file's chunks together.
        state: the server.
        now: the record's time (default: the clock).

    Returns:
        The stored record.

    A full disk fails the job with the reason (`jobs.fail_job`, its workers ended): its next
    checkpoint would meet the same disk, and a restart too; a user sees why it stopped.

    Raises:
        JobNotFound: no such job.
        StateConflict: the job is over (FAILED_PRECONDITION); nothing is stored.
        ValidationError, ChecksumMismatch, BlobTooLarge: as `store_checkpoint`.
        DiskFull: as `store_checkpoint`; the job has failed with its message.
    """
    try:
        record, received = store_checkpoint(upload, chunks, state.store, state.blobs,
                                            states=WORKER_STATES, now=now)
    except DiskFull as e:
        try:
            fail_job(upload.job_id, f"the checkpoint of step {upload.step} cannot be stored: "
                                    f"{e}", state)
        except CoordinatorError:  # the store itself is full or closed: the upload's error
            log.exception("job %s: cannot record the failure", upload.job_id)  # says it
        raise
    state.metrics.add_checkpoint_bytes("stored", received)
    return record


# ---------------------------------------------------------------- reading

def list_checkpoints(job_id: str, state: ServiceState) -> list[CheckpointRecord]:
    """A job's stored checkpoints, oldest step first.

    Raises:
        JobNotFound: no such job.
    """
    return state.store.list_checkpoints(job_id)


def verify_record(record: CheckpointRecord, blobs: BlobStore) -> None:
    """Check that every blob of a stored checkpoint is present and hashes to its name.

    Raises:
        BlobNotFound: a file is missing.
        BlobCorrupted: a file no longer matches its digest.
    """
    for name in record_blobs(record).values():
        blobs.verify(name)


def intact_checkpoint(job_id: str, state: ServiceState) -> CheckpointRecord | None:
    """The job's newest checkpoint whose every blob is present and verifies.

    Each damaged checkpoint skipped is logged and recorded as a ``log`` event of the job.

    Returns:
        The record, or None when no checkpoint is intact.

    Raises:
        JobNotFound: no such job.
    """
    for record in reversed(state.store.list_checkpoints(job_id)):
        try:
            verify_record(record, state.blobs)
        except (BlobCorrupted, BlobNotFound) as e:
            message = (f"coordinator: checkpoint at step {record.step} is damaged ({e}); "
                       f"skipping it")
            log.warning("job %s: %s", job_id, message)
            state.store.append_event(job_id, EventKind.LOG, {"line": message})
            continue
        return record
    return None


def open_download(job_id: str, step: int | None, name: str, state: ServiceState,
                  offset: int = 0, length: int = 0
                  ) -> tuple[int, FileEntry, int, Iterator[bytes]]:
    """One file of a checkpoint, for its receiver to verify while it streams.

    The file is read once and not hashed here: the receiver hashes what it gets anyway
    (``client.Client.download_checkpoint`` keeps nothing that fails the returned digest), so a
    second pass here would only double the CPU a download costs. Only choosing the newest
    intact checkpoint (`step` None) reads its files beforehand, to fall back past damage.

    Args and Raises: as `locate_download`.

    Returns:
        ``(step, file, end, chunks)``; the chunks are at most `CHUNK_BYTES` each, from
        `offset` up to `end` (``offset + length``, or the file's size where that comes
        first). ``file.size`` is the stored file's size; ``file.digest`` and
        ``file.algorithm`` are what the bytes must hash to (the manifest's entry; sha256 for
        ``manifest.json``).
    """
    found = locate_download(job_id, step, name, state, offset, length)
    try:
        chunks = state.blobs.read(found.blob, chunk_size=CHUNK_BYTES, verify=False,
                                  offset=offset, length=found.end - offset)
    except BaseException:
        found.lease.release()
        raise
    return found.step, found.entry, found.end, LeasedStream(found.lease, _counted(state, chunks))


@dataclass(frozen=True)
class DownloadPlace:
    """Where the bytes of a download are (`locate_download`).

    Attributes:
        step: the checkpoint's step.
        entry: the file as the receiver must find it (size, digest, algorithm).
        blob: its blob's name.
        path: its blob's file.
        offset: the first byte to send.
        end: the offset just past the last byte to send.
        lease: holds the blob until released (``server.blobs``): release it when done.
    """

    step: int
    entry: FileEntry
    blob: str
    path: Path
    offset: int
    end: int
    lease: BlobLease


def locate_download(job_id: str, step: int | None, name: str, state: ServiceState,
                    offset: int = 0, length: int = 0) -> DownloadPlace:
    """`open_download`'s checks and choice of file, without reading it: where its bytes are
    (the data port sends them from the file; ``server.data_port``), its blob leased.

    Args:
        job_id: the job.
        step: the checkpoint's step; None: the newest intact checkpoint.
        name: the file (``""``: ``model.safetensors``), or ``manifest.json``.
        state: the server.
        offset: send the bytes from here on (a resumed download; the receiver hashes the ones
            it kept with the rest).
        length: send at most this many bytes (one of several byte ranges a receiver fetches
            at once and hashes whole once all are in); 0: up to the file's end.

    Raises:
        JobNotFound, CheckpointNotFound: no such job or checkpoint.
        ValidationError: naming ``file`` when the checkpoint has no such file.
        OutOfRange: naming ``offset`` when it is negative or beyond the file's size, or
            ``length`` when it is negative.
        BlobNotFound: the stored file is missing.
    """
    name = name or DEFAULT_FILE
    if offset < 0:
        raise OutOfRange("offset", "must be >= 0", offset)
    if length < 0:
        raise OutOfRange("length", "must be >= 0", length)
    if step is None:
        record = intact_checkpoint(job_id, state)
        if record is None:
            raise CheckpointNotFound(job_id, None)
    else:
        record = state.store.get_checkpoint(job_id, step)
    blobs = record_blobs(record)
    if name not in blobs:
        raise ValidationError("file", "must be one of " + ", ".join(sorted(blobs)), name)
    lease = state.blobs.lease([blobs[name]])  # held until the transfer ends (server.blobs)
    try:
        size = state.blobs.size(blobs[name])
        if offset > size:
            raise OutOfRange("offset", f"must be at most the file's size ({size} bytes)", offset)
        path = state.blobs.get(blobs[name], verify=False)
    except BaseException:
        lease.release()
        raise
    listed = {f.name: f for f in record_files(record)}.get(name)
    digest, algorithm = (record.sha256, "sha256") if listed is None else (listed.digest,
                                                                          listed.algorithm)
    end = min(size, offset + length) if length else size
    return DownloadPlace(record.step, FileEntry(name, size, digest, algorithm), blobs[name],
                         path, offset, end, lease)


def _counted(state: ServiceState, chunks: Iterator[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        state.metrics.add_checkpoint_bytes("served", len(chunk))
        yield chunk


@dataclass(frozen=True)
class FetchPlace:
    """Where the files of a fetch are (`locate_fetch`).

    Attributes:
        header: the checkpoint as in an upload (job, step, manifest, files).
        paths: each file's blob file, in the header's order.
        lease: holds the blobs until released (``server.blobs``): release it when done.
    """

    header: CheckpointUpload
    paths: tuple[Path, ...]
    lease: BlobLease


def locate_fetch(job_id: str, state: ServiceState) -> FetchPlace:
    """`open_fetch`'s checks and choice of checkpoint, without reading its files: where their
    bytes are (the data port sends them from the files; ``server.data_port``), leased.

    Args and Raises: as `open_fetch`.
    """
    job = state.store.get_job(job_id)
    if job.state not in WORKER_STATES:
        raise StateConflict(job_id, job.state, WORKER_STATES)
    record = intact_checkpoint(job_id, state)
    if record is None:
        raise CheckpointNotFound(job_id, None)
    lease = state.blobs.lease(record_blobs(record).values())  # until the transfer ends
    try:
        manifest_json = b"".join(state.blobs.read(record.sha256))
        files = tuple(record_files(record))
        paths = tuple(state.blobs.get(blob_id(f.algorithm, f.digest), verify=False)
                      for f in files)
    except BaseException:
        lease.release()
        raise
    return FetchPlace(CheckpointUpload(job_id, record.step, manifest_json, files), paths, lease)


def open_fetch(job_id: str, state: ServiceState
               ) -> tuple[CheckpointUpload, Iterator[tuple[str, bytes]]]:
    """The job's newest intact checkpoint, to resume from: its header and every file's chunks.

    Args:
        job_id: the job.
        state: the server.

    Returns:
        ``(header, chunks)``: the header as in an upload; ``(file name, bytes)`` chunks in the
        header's file order.

    Raises:
        JobNotFound: no such job.
        StateConflict: the job is over: its workers' token is dead (FAILED_PRECONDITION).
        CheckpointNotFound: no intact checkpoint.
    """
    found = locate_fetch(job_id, state)

    def chunks() -> Iterator[tuple[str, bytes]]:
        # Not hashed again: `intact_checkpoint` just did, and the worker checks every file.
        for f in found.header.files:
            blob = state.blobs.read(blob_id(f.algorithm, f.digest), chunk_size=CHUNK_BYTES,
                                    verify=False)
            for chunk in _counted(state, blob):
                yield f.name, chunk

    return found.header, LeasedStream(found.lease, chunks())


# ---------------------------------------------------------------- retention

def keep_checkpoint(job_id: str, step: int, keep: bool, state: ServiceState
                    ) -> CheckpointRecord:
    """Mark a checkpoint to be kept by retention (`keep` True), or unmark it. Unmarking does
    not prune at once: the job's next checkpoint does.

    Returns:
        The record as it is now.

    Raises:
        JobNotFound, CheckpointNotFound.
    """
    return state.store.set_checkpoint_keep(job_id, step, keep)


def referenced_blobs(store: Store) -> set[str]:
    """Every blob some checkpoint record refers to: each record's ``manifest.json`` blob and
    the blob of every file its manifest lists; and every job's code archive.

    What retention and garbage collection must keep, e.g. at a server's start::

        blobs.collect_garbage(referenced_blobs(store))

    Args:
        store: the records (of every job).

    Returns:
        The blobs' names (`server.blobs.blob_id`).
    """
    blobs = {sha for record in store.all_checkpoints() for sha in record_blobs(record).values()}
    page = ""
    while True:  # and the code archive of every job that ships one (restarts fetch it again)
        jobs, page = store.list_jobs(None, 1000, page)
        blobs.update(d for job in jobs if (d := code_digest(job.spec.get("code"))))
        if not page:
            return blobs


def prune_job_checkpoints(store: Store, blobs: BlobStore, job_id: str,
                          keep: int) -> list[CheckpointRecord]:
    """Keep a job's newest `keep` checkpoints and those marked kept; forget the rest and free
    their blobs (`free_blobs`).

    Records go first, blobs after (so nobody is offered a checkpoint whose files are going,
    and a crash in between leaves only unreferenced blobs for the next start's garbage
    collection).

    Args:
        store: the records.
        blobs: the files.
        job_id: the job.
        keep: how many of the newest checkpoints to keep, >= 1 (the spec's
            ``checkpoint.keep``), besides the marked ones.

    Returns:
        The records removed, oldest first.

    Raises:
        ValidationError: naming ``checkpoint.keep``.
        JobNotFound: no such job.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValidationError("checkpoint.keep", "must be an integer >= 1", keep)
    records = store.list_checkpoints(job_id)
    removed = []
    for record in records[:-keep]:
        if record.keep:
            continue
        try:
            removed.append(store.delete_checkpoint(job_id, record.step))
        except LookupError:  # someone else removed it meanwhile
            continue
    free_blobs(store, blobs, {sha: record.created_at for record in removed
                              for sha in record_blobs(record).values()})
    return removed


def free_blobs(store: Store, blobs: BlobStore, candidates: Mapping[str, float]) -> list[str]:
    """Delete the blobs of forgotten records that no remaining record refers to.

    A blob written again after the forgotten record was made is spared: another upload (of a
    checkpoint, or of code a submission is about to name) stored the same bytes and may record
    them any moment; ``BlobStore.collect_garbage`` removes it later if nobody does. Call this
    only after the records are gone.

    Args:
        store: the records.
        blobs: the files.
        candidates: blob name -> when the forgotten record that used it was made (a
            checkpoint's ``created_at``, a job's ``submitted_at`` for its code).

    Returns:
        The blobs deleted now (a leased one goes when its transfer ends: `server.blobs`).
    """
    old = {name: made for name, made in candidates.items() if blobs.modified(name) <= made}
    if not old:
        return []
    # What is referenced is read first, each blob's time again after: bytes that an upload
    # stored again meanwhile carry a new time and are spared.
    live = referenced_blobs(store)
    return [name for name, made in sorted(old.items())
            if name not in live and blobs.modified(name) <= made and blobs.delete(name)]
