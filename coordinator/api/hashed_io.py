"""`write_hashed`: write a stream of chunks to a file durably, hashing it on the way, fast.

Both ends of a checkpoint transfer receive a file as chunks and must hash it, write it and fsync
it: the server storing an upload as a blob (`coordinator.blobs.BlobStore.put`) and the client
saving a download (`client.client.Client.download_checkpoint`). Done one after another in
the receiving thread, those steps cost their sum, and the final fsync then waits for the whole
file to reach the disk. Here the caller's thread receives and hashes while a writer thread
writes (the hashers and file writes release the GIL for large buffers), and the writer starts
the disk's write-back every `SYNC_BYTES` as it goes, so the final fsync only waits for the
tail. On Linux the write-back is started without waiting for it (``sync_file_range`` with
``SYNC_FILE_RANGE_WRITE``), so the disk writes while the writer goes on; elsewhere the writer
waits for it (``fdatasync``). Only the final fsync makes the file durable: starting write-back
early changes when the bytes go to the disk, not whether (docs/benchmarks.md, "Coordinator").

Example::

    with open(tmp, "wb") as f:
        digest, size = write_hashed((message.chunk for message in stream), f, "blake3")
    if digest != expected:
        ...  # delete tmp, else rename it into place
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from blake3 import blake3

from dptrain.worker import checkpoint_manifest
from dptrain.worker.checkpoint_manifest import new_hasher

__all__ = ["write_hashed", "write_at", "hash_file", "BytesLike", "DEPTH", "SYNC_BYTES"]

BytesLike = bytes | bytearray | memoryview

DEPTH = 4
"""Chunks the writer may lag behind the caller (with 1 MiB chunks, 4 MiB in memory)."""

SYNC_BYTES = 4 * 1024 * 1024
"""The writer starts the disk's write-back after this many bytes."""

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages, do not wait
_DONE = object()


def _write_back_starter() -> Callable[[int], None]:
    """``start(fd)``: have the disk start writing the file's dirty pages.

    Linux's ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`` (the whole file) queues the
    pages not already under write-back and returns. Its result is ignored: it is a hint, and
    any write error is the final fsync's to report. Without it (another system, a C library
    without it), ``fdatasync``, which waits.
    """
    try:
        sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    sync_file_range.restype = ctypes.c_int

    def start(fd: int) -> None:
        sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # ctypes releases the GIL

    return start


_start_write_back = _write_back_starter()


class _Writer:
    """Writes chunks to a file on a thread of its own, in order, starting the write-back every
    `SYNC_BYTES`.

    An error of the writer is raised by the next `put` or by `finish`; chunks after it are
    dropped.
    """

    def __init__(self, f: BinaryIO):
        self._f = f
        self._queue: queue.Queue = queue.Queue(DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dptrain-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        unsynced = 0
        while (chunk := self._queue.get()) is not _DONE:
            if self._error is not None:
                continue  # drain until the caller's _DONE
            try:
                self._f.write(chunk)
                unsynced += len(chunk)
                if unsynced >= SYNC_BYTES:
                    self._f.flush()
                    _start_write_back(self._f.fileno())
                    unsynced = 0
            except BaseException as e:  # raised again in the caller's thread
                self._error = e

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def finish(self) -> None:
        """Wait until every chunk is written; raise the writer's error, if any."""
        self._queue.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop the chunks not yet written and wait for the thread to end."""
        self._error = self._error or RuntimeError("write abandoned")
        self._queue.put(_DONE)
        self._thread.join()


def _immutable(chunk: object) -> bool:
    """Bytes, or a view of bytes (as `api.chunk_wire` decodes a received chunk): nobody can
    change them while the writer thread has them, so they need no copy."""
    return isinstance(chunk, bytes) or (isinstance(chunk, memoryview) and chunk.readonly
                                        and isinstance(chunk.obj, bytes))


def write_hashed(chunks: Iterable[BytesLike], f: BinaryIO, algorithm: str, *,
                 hasher: Any = None) -> tuple[str, int]:
    """Write every chunk to the open file `f`, fsync it, and return the bytes' digest.

    The caller's thread iterates `chunks` (e.g. receives them) and hashes each while a writer
    thread writes the previous ones. Nothing is verified here: the caller compares the digest
    with the one it expects, then renames the file into place or deletes it.

    Args:
        chunks: the bytes, in order (e.g. a transfer stream's payloads). A chunk that is
            neither ``bytes`` nor a view of ``bytes`` is copied first, so the caller may reuse
            its buffer.
        f: a file open for binary writing (``open(path, "wb")``); left open, flushed and
            fsynced.
        algorithm: the hash algorithm (``worker.checkpoint_manifest.HASH_ALGORITHMS``).
        hasher: a hasher of `algorithm` already fed the bytes before these (a resumed
            download appends to the part it kept); default a new one.

    Returns:
        ``(hex digest, size in bytes)``: the digest of everything `hasher` was fed, the size
        of what was written here.

    Raises:
        ValueError: an unknown algorithm.
        TypeError: a chunk is not bytes-like.
        OSError: writing or syncing failed.
        Exception: whatever iterating `chunks` raised, unchanged, after every chunk before
            it was written (not synced).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryFile() as f:
        ...     write_hashed([b"ab", b"c"], f, "blake3")[1]
        3
    """
    digest, size = new_hasher(algorithm) if hasher is None else hasher, 0
    writer = _Writer(f)
    try:
        for chunk in chunks:
            if not _immutable(chunk):  # the writer must see the bytes as they are now
                if not isinstance(chunk, (bytearray, memoryview)):
                    raise TypeError(f"chunks must be bytes-like, got {type(chunk).__name__}")
                chunk = bytes(chunk)
            size += len(chunk)
            writer.put(chunk)
            digest.update(chunk)
        writer.finish()
    except Exception:
        # The chunks before the error are written all the same: a resumed download keeps
        # them. An error of the writer's own here is secondary to this one.
        with contextlib.suppress(Exception):
            writer.finish()
        raise
    except BaseException:
        writer.abort()
        raise
    f.flush()
    os.fsync(f.fileno())
    return digest.hexdigest(), size


def write_at(fd: int, chunks: Iterable[BytesLike], position: list[int], end: int,
             on_chunk: Callable[[int], None] | None = None) -> None:
    """Write a byte range's chunks at their offsets in an open file, starting the disk's
    write-back every `SYNC_BYTES` (as `write_hashed` does), without hashing them: one of
    several ranges of a file written at once from as many threads, the whole file hashed once
    all are in (`hash_file`).

    Args:
        fd: the file's descriptor, open for writing (``os.pwrite`` needs no shared position).
        chunks: the range's bytes, in order.
        position: ``[offset]`` where the next chunk goes, advanced past each chunk written, so
            that the caller knows how far the range got when the chunks break off.
        end: the offset the range must not pass.
        on_chunk: called with each chunk's size once it is written.

    Raises:
        ValueError: a chunk would pass `end` (nothing of it written).
        OSError: writing failed.
        Exception: whatever iterating `chunks` raised.
    """
    unsynced = 0
    for chunk in chunks:
        if position[0] + len(chunk) > end:
            raise ValueError(f"{position[0] + len(chunk) - end} more bytes than asked for")
        size, done = len(chunk), 0
        while done < size:  # pwrite releases the GIL; a short write goes on where it stopped
            done += os.pwrite(fd, memoryview(chunk)[done:] if done else chunk,
                              position[0] + done)
        position[0] += size
        unsynced += size
        if unsynced >= SYNC_BYTES:
            _start_write_back(fd)
            unsynced = 0
        if on_chunk is not None:
            on_chunk(size)


def hash_file(path: str | os.PathLike, algorithm: str) -> str:
    """The hex digest of a whole file: BLAKE3 over a memory map on every core (BLAKE3's tree
    hashes parts of the file in parallel), another algorithm as a checkpoint's files are
    hashed (``worker.checkpoint_manifest.hash_file``, one pass).

    Args:
        path: the file.
        algorithm: the hash algorithm (``worker.checkpoint_manifest.HASH_ALGORITHMS``).

    Raises:
        ValueError: an unknown algorithm.
        OSError: the file cannot be read.
    """
    if algorithm == "blake3":
        return blake3(max_threads=blake3.AUTO).update_mmap(path).hexdigest()
    return checkpoint_manifest.hash_file(path, algorithm)
