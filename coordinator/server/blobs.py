"""Checkpoint blobs on disk, content-addressed by sha256: `BlobStore`.

A blob is stored under its digest, ``ROOT/ab/cdef…`` (the first two hex digits name a shard
directory, so no directory grows huge). `BlobStore.put` writes to a temporary file in
``ROOT/tmp/``, hashing as it goes, fsyncs it, checks the digest the sender declared, renames it
into place and fsyncs the directory: a blob is visible only once complete and durable, and a
failed or refused upload leaves nothing behind. Reads verify the digest while streaming, so a
blob damaged on disk raises `BlobCorrupted` after its last chunk (a download ends with
DATA_LOSS instead of completing).

Blobs know nothing of jobs or checkpoints: which blobs a checkpoint consists of, which one is
the newest intact checkpoint, retention and the set of referenced blobs are
`server.checkpoint_store`'s business. `BlobStore.collect_garbage` removes what nothing refers
to any more and what a crash left behind, given that set.

Example::

    blobs = BlobStore(state_dir / "blobs")
    sha256, size = blobs.put(chunks, expected_sha256=declared)   # from the upload stream
    for chunk in blobs.read(sha256):                               # to the download stream
        ...
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

from dptrain.atomic_files import fsync_directory
from dptrain.coordinator.api.errors import (
    BlobCorrupted,
    BlobNotFound,
    BlobTooLarge,
    ChecksumMismatch,
    ValidationError,
)
from dptrain.coordinator.api.hashed_io import BytesLike, write_hashed
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.server.private_files import make_private_dir

__all__ = ["BlobStore", "check_sha256"]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP = "tmp"


def check_sha256(value: object, field: str = "sha256") -> str:
    """Return `value` if it is a sha256 hex digest (64 lowercase hex digits).

    Args:
        value: the digest to check.
        field: the field name the error should mention.

    Raises:
        ValidationError: naming `field`.
    """
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ValidationError(field, "must be 64 lowercase hex digits (a sha256 digest)", value)
    return value


class BlobStore:
    """Immutable byte blobs in a directory, named by their sha256.

    Safe for many threads: every write goes to its own temporary file and lands with an atomic
    rename; putting the same content twice stores it once.

    Args:
        root: the directory (created when missing).
        max_size: refuse blobs larger than this many bytes (None: no limit).
    """

    def __init__(self, root: str | os.PathLike, *, max_size: int | None = None):
        self.root = Path(root)
        self.max_size = max_size
        make_private_dir(self.root / _TMP)

    def _path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256[2:]

    # -- writing

    def put(self, data: BytesLike | Iterable[BytesLike], *,
            expected_sha256: str | None = None) -> tuple[str, int]:
        """Store bytes, atomically: complete and durable, or not at all.

        Args:
            data: the bytes, or an iterable of chunks (e.g. an upload stream's payloads).
            expected_sha256: the digest the sender declared; the blob is refused unless the
                bytes match it.

        Returns:
            ``(sha256, size)`` of the stored blob.

        Raises:
            ValidationError: `expected_sha256` is not a digest.
            TypeError: `data` is a str (encode it first) or yields something not bytes-like.
            ChecksumMismatch: the bytes do not hash to `expected_sha256`.
            BlobTooLarge: more than ``max_size`` bytes.
            Exception: whatever iterating `data` raised (a broken upload), unchanged.
        """
        if expected_sha256 is not None:
            check_sha256(expected_sha256, "expected_sha256")
        if isinstance(data, str):
            raise TypeError("data: must be bytes or an iterable of bytes chunks, got a str")
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        fd, tmp = tempfile.mkstemp(dir=self.root / _TMP, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                sha256, size = write_hashed(self._limited(chunks), f)
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise ChecksumMismatch(expected_sha256, sha256, size)
            final = self._path(sha256)
            created = not final.parent.is_dir()
            if created:
                make_private_dir(final.parent)
                fsync_directory(self.root)
            # Replace rather than skip an existing file: a damaged copy gets repaired.
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_directory(final.parent)
        return sha256, size

    def _limited(self, chunks: Iterable[BytesLike]) -> Iterator[BytesLike]:
        """`chunks`, raising `BlobTooLarge` before the first byte beyond ``max_size``."""
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if self.max_size is not None and size > self.max_size:
                raise BlobTooLarge(self.max_size)
            yield chunk

    def delete(self, sha256: str) -> bool:
        """Remove a blob.

        Args:
            sha256: its digest.

        Returns:
            True when it existed.
        """
        path = self._path(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_directory(path.parent)
        return True

    # -- reading

    def exists(self, sha256: str) -> bool:
        """True when a blob with this digest is stored (not verified)."""
        return self._path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """The stored blob's size in bytes.

        Raises:
            BlobNotFound: no such blob.
        """
        try:
            return self._path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def read(self, sha256: str, *, chunk_size: int = CHUNK_BYTES,
             verify: bool = True) -> Iterator[bytes]:
        """The blob's bytes in chunks, verified while streaming.

        When the bytes do not hash to `sha256`, `BlobCorrupted` is raised after the last chunk,
        so a download stream ends with an error instead of completing. Use `verify` first to
        check a blob before sending any of it.

        Args:
            sha256: its digest.
            chunk_size: bytes per chunk.
            verify: check the digest at the end.

        Returns:
            An iterator of chunks of at most `chunk_size` bytes.

        Raises:
            BlobNotFound, BlobCorrupted.
        """
        path = self._path(sha256)
        if not path.is_file():  # raise now, not at the first next()
            raise BlobNotFound(sha256)
        return self._read(path, sha256, chunk_size, verify)

    @staticmethod
    def _read(path: Path, sha256: str, chunk_size: int, verify: bool) -> Iterator[bytes]:
        digest, size = hashlib.sha256(), 0
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # deleted since read() looked
            raise BlobNotFound(sha256) from None
        with f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
                size += len(chunk)
                yield chunk
        if verify and digest.hexdigest() != sha256:
            raise BlobCorrupted(sha256, digest.hexdigest(), size)

    def verify(self, sha256: str) -> int:
        """Read the whole blob and check its digest.

        Returns:
            Its size in bytes.

        Raises:
            BlobNotFound, BlobCorrupted.
        """
        return sum(len(chunk) for chunk in self.read(sha256))

    def get(self, sha256: str, *, verify: bool = True) -> Path:
        """The path of a stored blob, verified first: for handing the file to a local reader.

        The file must be treated as read-only; it stays valid until `delete`.

        Raises:
            BlobNotFound, BlobCorrupted.
        """
        if verify:
            self.verify(sha256)
        elif not self.exists(sha256):
            raise BlobNotFound(sha256)
        return self._path(sha256)

    def __iter__(self) -> Iterator[str]:
        """The digests of all stored blobs (in no particular order)."""
        for shard in self.root.iterdir():
            if len(shard.name) == 2 and shard.is_dir():
                for blob in shard.iterdir():
                    if _SHA256_RE.match(shard.name + blob.name):
                        yield shard.name + blob.name

    def collect_garbage(self, referenced: Container[str], *, min_age: float = 3600.0,
                        now: float | None = None) -> list[str]:
        """Delete blobs nothing refers to and temporary files that crashed uploads left.

        Only files older than `min_age` seconds go, so a blob just uploaded but not yet
        recorded, or an upload in progress, is never removed.

        Args:
            referenced: the digests to keep: every blob of every checkpoint record,
                ``server.checkpoint_store.referenced_blobs(store)``.
            min_age: seconds since a file's last modification before it may go.
            now: the current time (unix seconds); default the clock.

        Returns:
            The digests of the deleted blobs.
        """
        cutoff = (time.time() if now is None else now) - min_age
        for tmp in (self.root / _TMP).iterdir():
            if _modified(tmp) <= cutoff:
                tmp.unlink(missing_ok=True)
        deleted = []
        for sha256 in list(self):
            if sha256 not in referenced and _modified(self._path(sha256)) <= cutoff:
                if self.delete(sha256):
                    deleted.append(sha256)
        return deleted

    def modified(self, sha256: str) -> float:
        """When the blob was last written (unix seconds); ``inf`` when it is missing."""
        return _modified(self._path(sha256))


def _modified(path: Path) -> float:
    """A file's modification time; ``inf`` (never old enough to delete) when it is gone, e.g.
    an upload's temporary file renamed into place meanwhile."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")

