"""Checkpoint blobs on disk, content-addressed: `BlobStore`.

A blob is named by its digest (`blob_id`): a sha256 is the name itself and lies at
``ROOT/ab/cdef…`` (the first two hex digits name a shard directory, so no directory grows
huge); a BLAKE3 digest is named ``blake3:abcdef…`` and lies at ``ROOT/blake3/ab/cdef…``.
Checkpoint files are BLAKE3 blobs now (``worker.checkpoint_manifest.DEFAULT_HASH``), so a blob's
name is its manifest entry; those of checkpoints stored before, and every ``manifest.json``, are
sha256 blobs where they always were. `BlobStore.put` writes to a temporary file in
``ROOT/tmp/``, hashing as it goes, fsyncs it, checks the digest the sender declared, renames it
into place and fsyncs the directory: a blob is visible only once complete and durable, and a
failed or refused upload leaves nothing behind; a full disk (ENOSPC, or the quota's EDQUOT)
raises `DiskFull`, its temporary file removed and every stored blob as it was. Reads verify
the digest while streaming unless told not to (a download leaves that to its receiver, which
hashes what it gets anyway), so a blob damaged on disk raises `BlobCorrupted` after its last
chunk.

Deleting never pulls a blob from under a reader. A transfer (a download, a worker's fetch of a
checkpoint or of its code) takes a `BlobLease` on the blobs it sends; `BlobStore.delete` of a
leased blob is deferred until its last lease ends, and called off when the same bytes are put
again meanwhile (someone is about to record them). An upload pins the blobs it is about to
record (``lease(names, pin=True)``) until their record is written: deleting a pinned blob is
skipped, as what nothing records after all is garbage for the next collection. And while
``dptrain backup`` copies the blob directory it holds ``ROOT/backup.lock``: deletions are
skipped then, leaving garbage for the next `BlobStore.collect_garbage` rather than a backup
whose records lack their blobs.

Blobs know nothing of jobs or checkpoints: which blobs a checkpoint consists of, which one is
the newest intact checkpoint, retention and the set of referenced blobs are
`server.checkpoint_store`'s business. `BlobStore.collect_garbage` removes what nothing refers
to any more and what a crash left behind, given that set.

Example::

    blobs = BlobStore(state_dir / "blobs")
    name, size = blobs.put(chunks, expected=blob_id("blake3", declared))  # an upload stream
    for chunk in blobs.read(name):                                          # verified
        ...
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import tempfile
import threading
import time
from collections.abc import Container, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from dptrain.atomic_files import fsync_directory
from dptrain.coordinator.api.errors import (
    BlobCorrupted,
    BlobNotFound,
    BlobTooLarge,
    ChecksumMismatch,
    DiskFull,
    ValidationError,
)
from dptrain.coordinator.api.hashed_io import BytesLike, write_hashed
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.server.private_files import make_private_dir
from dptrain.worker.checkpoint_manifest import HASH_ALGORITHMS, check_digest, new_hasher

__all__ = ["BlobStore", "BlobLease", "LeasedStream", "blob_id", "parse_blob_id",
           "BACKUP_LOCK"]

_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP = "tmp"
#: Held (``flock`` LOCK_EX) by a backup while it copies the blobs; deleting takes it shared.
BACKUP_LOCK = "backup.lock"
_T = TypeVar("_T")
_LEGACY = "sha256"  # the algorithm whose blobs are named by the bare digest, at the root


def blob_id(algorithm: str, digest: str, field: str = "sha256") -> str:
    """The name of the blob whose bytes have this digest.

    Args:
        algorithm: ``sha256`` or ``blake3`` (``worker.checkpoint_manifest.HASH_ALGORITHMS``).
        digest: 64 lowercase hex digits.
        field: the field name an error should mention.

    Returns:
        The digest itself for sha256, ``"blake3:<digest>"`` for BLAKE3.

    Raises:
        ValidationError: naming `field`: an unknown algorithm or a malformed digest.
    """
    rule = check_digest(algorithm, digest)
    if rule is not None:
        raise ValidationError(field, rule, digest if algorithm == _LEGACY else
                              f"{algorithm}:{digest}")
    return digest if algorithm == _LEGACY else f"{algorithm}:{digest}"


def parse_blob_id(name: object, field: str = "sha256") -> tuple[str, str]:
    """The ``(algorithm, digest)`` of a blob name made by `blob_id`.

    Raises:
        ValidationError: naming `field`, for anything `blob_id` does not make.
    """
    if isinstance(name, str) and _HEX64_RE.fullmatch(name):
        return _LEGACY, name
    algorithm, _, digest = name.partition(":") if isinstance(name, str) else ("", "", "")
    if algorithm == _LEGACY or check_digest(algorithm, digest) is not None:
        raise ValidationError(field, "must be a sha256 (64 lowercase hex digits) or "
                              "blake3:<64 lowercase hex digits>", name)
    return algorithm, digest


class BlobStore:
    """Immutable byte blobs in a directory, named by their digest (`blob_id`).

    Safe for many threads: every write goes to its own temporary file and lands with an atomic
    rename; putting the same content twice stores it once.

    Args:
        root: the directory (created when missing).
        max_size: refuse blobs larger than this many bytes (None: no limit).
    """

    def __init__(self, root: str | os.PathLike, *, max_size: int | None = None):
        self.root = Path(root)
        self.max_size = max_size
        self._lease_lock = threading.Lock()  # guards the three below and every unlink/replace
        self._leases: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._doomed: set[str] = set()  # leased blobs to delete when their last lease ends
        make_private_dir(self.root / _TMP)
        make_private_dir(self.root / "blake3")  # so a new shard's parent always exists

    def _path(self, name: str) -> Path:
        algorithm, digest = parse_blob_id(name)
        root = self.root if algorithm == _LEGACY else self.root / algorithm
        return root / digest[:2] / digest[2:]

    # -- writing

    def put(self, data: BytesLike | Iterable[BytesLike], *, expected: str | None = None,
            algorithm: str = _LEGACY, size: int | None = None) -> tuple[str, int]:
        """Store bytes, atomically: complete and durable, or not at all.

        Args:
            data: the bytes, or an iterable of chunks (e.g. an upload stream's payloads).
            expected: the blob name (`blob_id`) of the digest the sender declared; the blob is
                refused unless the bytes match it. Its algorithm is the one used.
            algorithm: the hash algorithm when nothing is `expected`.
            size: the size the sender declared, for the message of a full disk.

        Returns:
            ``(name, size)`` of the stored blob.

        Raises:
            ValidationError: `expected` is not a blob name, or `algorithm` is unknown.
            TypeError: `data` is a str (encode it first) or yields something not bytes-like.
            ChecksumMismatch: the bytes do not hash to `expected`.
            BlobTooLarge: more than ``max_size`` bytes.
            DiskFull: the disk (or the user's quota) has no room left; nothing was stored.
            Exception: whatever iterating `data` raised (a broken upload), unchanged.
        """
        if expected is not None:
            algorithm, _ = parse_blob_id(expected, "expected")
        elif algorithm not in HASH_ALGORITHMS:
            raise ValidationError("algorithm", f"must be one of {', '.join(HASH_ALGORITHMS)}",
                                  algorithm)
        if isinstance(data, str):
            raise TypeError("data: must be bytes or an iterable of bytes chunks, got a str")
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            return self._put(chunks, expected, algorithm)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(self.root), size) from None
            raise

    def _put(self, chunks: Iterable[BytesLike], expected: str | None,
             algorithm: str) -> tuple[str, int]:
        fd, tmp = tempfile.mkstemp(dir=self.root / _TMP, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                digest, size = write_hashed(self._limited(chunks), f, algorithm)
            name = blob_id(algorithm, digest)
            if expected is not None and name != expected:
                raise ChecksumMismatch(expected, name, size)
            final = self._path(name)
            if not final.parent.is_dir():
                make_private_dir(final.parent)
                fsync_directory(final.parent.parent)
            with self._lease_lock:
                # Replace rather than skip an existing file: a damaged copy gets repaired.
                os.replace(tmp, final)
                self._doomed.discard(name)  # stored anew: a deferred deletion is called off
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_directory(final.parent)
        return name, size

    def _limited(self, chunks: Iterable[BytesLike]) -> Iterator[BytesLike]:
        """`chunks`, raising `BlobTooLarge` before the first byte beyond ``max_size``."""
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if self.max_size is not None and size > self.max_size:
                raise BlobTooLarge(self.max_size)
            yield chunk

    def delete(self, name: str) -> bool:
        """Remove a blob; while it is leased, when its last lease ends; while a backup copies
        the blobs, not at all (the next `collect_garbage` does).

        Args:
            name: its name (`blob_id`).

        Returns:
            True when it existed and is gone now.
        """
        path = self._path(name)
        with self._lease_lock:
            if self._pins.get(name):  # an upload is about to record it
                return False
            if self._leases.get(name):
                self._doomed.add(name)
                return False
            return self._unlink(path)

    def _unlink(self, path: Path) -> bool:
        """Remove a blob's file unless a backup holds `BACKUP_LOCK` (under ``_lease_lock``)."""
        lock_fd = os.open(self.root / BACKUP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        finally:
            os.close(lock_fd)  # releases the shared lock
        fsync_directory(path.parent)
        return True

    def lease(self, names: Iterable[str], *, pin: bool = False) -> BlobLease:
        """Keep blobs from being deleted until the returned lease is released.

        Args:
            names: the blobs (`blob_id`), present or not.
            pin: for an upload: a deletion meanwhile is skipped, not deferred (the upload is
                about to record the blobs).

        Returns:
            The lease, held from now on.
        """
        names = tuple(names)
        counts = self._pins if pin else self._leases
        with self._lease_lock:
            for name in names:
                counts[name] = counts.get(name, 0) + 1
        return BlobLease(self, names, pin)

    def _release(self, names: tuple[str, ...], pin: bool) -> None:
        counts = self._pins if pin else self._leases
        with self._lease_lock:
            for name in names:
                left = counts[name] - 1
                if left:
                    counts[name] = left
                    continue
                del counts[name]
                if not pin and name in self._doomed:
                    self._doomed.discard(name)
                    self._unlink(self._path(name))

    def leased(self, name: str) -> bool:
        """True while some transfer holds a lease on the blob."""
        with self._lease_lock:
            return bool(self._leases.get(name))

    # -- reading

    def exists(self, name: str) -> bool:
        """True when a blob of this name is stored (not verified)."""
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        """The stored blob's size in bytes.

        Raises:
            BlobNotFound: no such blob.
        """
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(name) from None

    def read(self, name: str, *, chunk_size: int = CHUNK_BYTES, verify: bool = True,
             offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """The blob's bytes in chunks, verified while streaming.

        When the bytes do not hash to their name, `BlobCorrupted` is raised after the last
        chunk, so a stream ends with an error instead of completing. Use `verify` first to
        check a blob before sending any of it.

        Args:
            name: the blob's name (`blob_id`).
            chunk_size: bytes per chunk.
            verify: hash the bytes and check the digest at the end; False where the receiver
                hashes them anyway (a download), so that they are hashed once, not twice.
            offset: start this many bytes in (a resumed download); only with ``verify=False``,
                as the digest covers the whole blob.
            length: read at most this many bytes (a byte range of a download); None: to
                the end. Only with ``verify=False``.

        Returns:
            An iterator of chunks of at most `chunk_size` bytes.

        Raises:
            BlobNotFound, BlobCorrupted.
        """
        if (offset or length is not None) and verify:
            raise ValueError("offset, length: a part of a blob cannot be verified")
        path = self._path(name)
        if not path.is_file():  # raise now, not at the first next()
            raise BlobNotFound(name)
        return self._read(path, name, chunk_size, verify, offset, length)

    @staticmethod
    def _read(path: Path, name: str, chunk_size: int, verify: bool,
              offset: int, length: int | None) -> Iterator[bytes]:
        algorithm, expected = parse_blob_id(name)
        digest, size = new_hasher(algorithm) if verify else None, 0
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # deleted since read() looked
            raise BlobNotFound(name) from None
        with f:
            f.seek(offset)
            pos, end = offset, None if length is None else offset + length
            while chunk := f.read(chunk_size if end is None else min(chunk_size, end - pos)):
                pos += len(chunk)
                if digest is not None:
                    digest.update(chunk)
                size += len(chunk)
                yield chunk
        if digest is not None and digest.hexdigest() != expected:
            raise BlobCorrupted(name, blob_id(algorithm, digest.hexdigest()), size)

    def verify(self, name: str) -> int:
        """Read the whole blob and check its digest.

        Returns:
            Its size in bytes.

        Raises:
            BlobNotFound, BlobCorrupted.
        """
        return sum(len(chunk) for chunk in self.read(name))

    def get(self, name: str, *, verify: bool = True) -> Path:
        """The path of a stored blob, verified first: for handing the file to a local reader.

        The file must be treated as read-only; it stays valid until `delete`.

        Raises:
            BlobNotFound, BlobCorrupted.
        """
        if verify:
            self.verify(name)
        elif not self.exists(name):
            raise BlobNotFound(name)
        return self._path(name)

    def __iter__(self) -> Iterator[str]:
        """The names of all stored blobs (in no particular order)."""
        for root, prefix in ((self.root, ""), (self.root / "blake3", "blake3:")):
            if not root.is_dir():
                continue
            for shard in root.iterdir():
                if len(shard.name) == 2 and shard.is_dir():
                    for blob in shard.iterdir():
                        if _HEX64_RE.match(shard.name + blob.name):
                            yield prefix + shard.name + blob.name

    def collect_garbage(self, referenced: Container[str], *, min_age: float = 3600.0,
                        now: float | None = None) -> list[str]:
        """Delete blobs nothing refers to and temporary files that crashed uploads left.

        Only files older than `min_age` seconds go, so a blob just uploaded but not yet
        recorded, or an upload in progress, is never removed.

        Args:
            referenced: the names to keep: every blob of every checkpoint record,
                ``server.checkpoint_store.referenced_blobs(store)``.
            min_age: seconds since a file's last modification before it may go.
            now: the current time (unix seconds); default the clock.

        Returns:
            The names of the deleted blobs.
        """
        cutoff = (time.time() if now is None else now) - min_age
        for tmp in (self.root / _TMP).iterdir():
            if _modified(tmp) <= cutoff:
                tmp.unlink(missing_ok=True)
        deleted = []
        for name in list(self):
            if name not in referenced and _modified(self._path(name)) <= cutoff:
                if self.delete(name):
                    deleted.append(name)
        return deleted

    def modified(self, name: str) -> float:
        """When the blob was last written (unix seconds); ``inf`` when it is missing."""
        return _modified(self._path(name))


def _modified(path: Path) -> float:
    """A file's modification time; ``inf`` (never old enough to delete) when it is gone, e.g.
    an upload's temporary file renamed into place meanwhile."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")



class BlobLease:
    """Blobs kept from deletion (`BlobStore.lease`) until `release`; releasing twice is
    harmless. Usable as a context manager."""

    def __init__(self, blobs: BlobStore, names: tuple[str, ...], pin: bool = False):
        self._blobs, self._names, self._pin = blobs, names, pin
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        """End the lease; a deletion deferred by it happens now."""
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._blobs._release(self._names, self._pin)

    def __enter__(self) -> BlobLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LeasedStream(Iterator[_T]):
    """An iterator that holds a lease until it is exhausted, fails, is closed or collected.

    A generator would not do: closing one that never started skips its ``finally``, and a
    stream is closed unstarted when its receiver goes away after the first message.

    Args:
        lease: the lease (released by this stream).
        items: what to iterate.
    """

    def __init__(self, lease: BlobLease, items: Iterator[_T]):
        self._lease, self._items = lease, items

    def __next__(self) -> _T:
        try:
            return next(self._items)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop: close the underlying iterator and release the lease."""
        try:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        finally:
            self._lease.release()

    def __del__(self) -> None:
        self._lease.release()
