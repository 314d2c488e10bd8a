"""A checkpoint file's download as it gathers in its part file beside the destination: over
one stream, appended and hashed on the way (`append_to_part`), or as byte ranges fetched at
once over several streams and hashed whole at the end (`RangedDownload`).

One gRPC stream moves a file at most at the rate its one receiving thread allows (grpcio's
receiving costs about 1 ms of CPU per MiB), under what a disk takes (docs/benchmarks.md,
"Checkpoint transfer"). Given ``streams`` > 1, `Client.download_checkpoint` asks its first
stream for the first `FIRST_RANGE_BYTES` only (DownloadCheckpoint's ``length``); when the server's
answer says it honours ranges (``DownloadInfo.end``), a `RangedDownload` fetches the rest
alongside as a few more ranges, each thread writing its chunks at their offsets in the one
part file (``os.pwrite``). Nothing is hashed as it arrives: once every range is in, the part
is fsynced and hashed whole (`api.hashed_io.hash_file`: BLAKE3 on every core) and checked
against the manifest's digest, as a single stream's bytes are.

A broken stream leaves each range where it stopped: the next try (same call) asks only for
what each range lacks. When the call gives up, the part is cut back to the bytes it holds
without a gap, so that a later call resumes it as it resumes a single stream's part.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dptrain.coordinator.api.hashed_io import BytesLike, hash_file, write_at, write_hashed
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.worker.checkpoint_manifest import FileEntry, new_hasher

__all__ = ["DownloadedFile", "DownloadProgress", "part_path", "part_size", "append_to_part",
           "RangedDownload", "RangeBroken", "DOWNLOAD_STREAMS", "FIRST_RANGE_BYTES",
           "plan_ranges"]

DOWNLOAD_STREAMS = 1
"""Streams one download uses at once by default. One: on the 2-core machine of
docs/benchmarks.md two streams were slower (more CPU on both ends, and the hash after the last
byte instead of while the bytes arrive); ranges are for a client with cores to spare."""

FIRST_RANGE_BYTES = 4 * CHUNK_BYTES
"""What the first stream asks for, before the file's size is known: a smaller file comes in
one stream."""

OpenRange = Callable[[int, int], tuple[Iterator[BytesLike], Callable[[], object]]]
"""``open_range(offset, length) -> (chunks, cancel)``: a stream of the file's bytes from
`offset`, at most `length` of them, already checked to describe the same file."""


@dataclass(frozen=True)
class DownloadedFile:
    """A checkpoint file written by `Client.download_checkpoint`, its digest verified.

    Attributes:
        path: where it was written.
        step: the checkpoint's step.
        name: the file's name in the checkpoint.
        size: its size in bytes.
        digest: the hex digest its bytes were verified against.
        algorithm: that digest's algorithm (``blake3``, or ``sha256`` for files of
            checkpoints written before BLAKE3, and for ``manifest.json``).
    """

    path: Path
    step: int
    name: str
    size: int
    digest: str
    algorithm: str


@dataclass(frozen=True)
class DownloadProgress:
    """Where a download stands, as `Client.download_checkpoint` reports it.

    Attributes:
        name: the file.
        step: the checkpoint's step.
        size: the file's size in bytes.
        done: the bytes received so far, kept ones included.
        resumed_at: the offset this stream resumed from; None for a stream from the start.
    """

    name: str
    step: int
    size: int
    done: int
    resumed_at: int | None


def part_size(path: Path) -> int:
    """The part file's size; 0 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def part_path(target: Path, expected: FileEntry) -> Path:
    """Where the bytes of `expected` gather before they are verified: named after its digest,
    so that only the same file's bytes are ever resumed."""
    return target.parent / f".{target.name}.{expected.algorithm}-{expected.digest[:16]}.part"


def append_to_part(part: Path, expected: FileEntry, offset: int, data: Iterable[BytesLike],
                   report: Callable[[int, int | None], None]) -> tuple[str, int]:
    """Append `data` to the part file kept up to `offset` and hash the whole: ``(digest of
    every byte, the part's size)``, calling ``report(done, resumed_at)`` after each chunk. A
    broken stream raises with what arrived kept (synced)."""
    hasher = new_hasher(expected.algorithm)
    with open(part, "ab") as f:
        f.truncate(offset)  # a byte past what the server was asked for is not ours
        with open(part, "rb") as prefix:  # the kept bytes, read back
            while block := prefix.read(CHUNK_BYTES):
                hasher.update(block)
        done = offset

        def counted() -> Iterator[BytesLike]:
            nonlocal done
            for chunk in data:
                done += len(chunk)
                yield chunk
                report(done, offset or None)

        try:
            digest, _ = write_hashed(counted(), f, expected.algorithm, hasher=hasher)
        except BaseException:
            f.flush()
            os.fsync(f.fileno())  # keep what arrived for the next try
            raise
    return digest, done


class RangeBroken(Exception):
    """A range's stream sent more or fewer bytes than it was asked for."""


def _split(start: int, end: int, count: int) -> list[tuple[int, int]]:
    """``[start, end)`` in `count` ranges of (nearly) equal size (fewer where there are not
    bytes enough)."""
    size = -(-(end - start) // count) or 1
    return [(offset, min(offset + size, end)) for offset in range(start, end, size)]


def plan_ranges(offset: int, first_end: int, size: int, streams: int
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """How ``[offset, size)`` is fetched by `streams` streams whose first has asked for
    ``[offset, first_end)``: ``(ranges in file order, the ones still to ask for in the order
    streams take them)``.

    Each stream gets one share of the bytes. The first finishes its small range before the
    others have got far, then takes the last range to ask for: the rest of its share.

    >>> M = CHUNK_BYTES
    >>> plan_ranges(0, 4 * M, 64 * M, 2)[1] == [(32 * M, 64 * M), (4 * M, 32 * M)]
    True
    """
    share = -(-(size - offset) // streams)
    first_share_end = min(size, max(first_end, offset + share))
    others = _split(first_share_end, size, streams - 1) if streams > 1 else []
    rest_of_first = [(first_end, first_share_end)] if first_share_end > first_end else []
    return [(offset, first_end), *rest_of_first, *others], others + rest_of_first


class RangedDownload:
    """A file's bytes from `offset` on, fetched as ranges into its part file.

    Args:
        part: the part file (its first `offset` bytes are kept; anything after is dropped).
        size: the whole file's size.
        offset: where this download starts.
        first_end: where the range of the first stream (already open) ends.
        streams: ranges fetched at once.
        open_range: opens the stream of a range (`OpenRange`).
        report: ``report(done, resumed_at)`` after each chunk, one call at a time: the bytes
            the part holds, and where the current try resumed (None: it did not).
    """

    def __init__(self, part: Path, size: int, offset: int, first_end: int, streams: int,
                 open_range: OpenRange,
                 report: Callable[[int, int | None], None] | None = None):
        self.part, self.size = part, size
        self._open_range, self._report, self._streams = open_range, report, streams
        # [start, position, end] of each range, in file order: position is where it got.
        ranges, order = plan_ranges(offset, first_end, size, streams)
        self._ranges = [[a, a, b] for a, b in ranges]
        self._order = [ranges.index(r) for r in order]  # the order streams take them in
        self.done = offset
        self._resumed_at: int | None = offset or None
        self._announce = False
        self._lock = threading.Lock()
        self._cancels: set[Callable[[], object]] = set()
        self._fd: int | None = os.open(part, os.O_WRONLY | os.O_CREAT, 0o666)
        os.ftruncate(self._fd, offset)  # a byte past what the server was asked for is not ours

    def run(self, first: Iterator[BytesLike] | None = None) -> None:
        """Fetch every range not yet complete, `streams` at a time.

        Args:
            first: the open stream of the first range (the first try only); later tries
                open a stream for each range from where it stopped.

        Raises:
            ClientError: a stream failed (the first failure; the other streams are cancelled
                and every range keeps what it got).
            RangeBroken: a stream sent more or less than its range.
        """
        todo = [self._ranges[i] for i in self._order if self._ranges[i][1] < self._ranges[i][2]]
        if first is None:  # a resumption: the first range too, reported once a stream is open
            self._announce = True
            if self._ranges[0][1] < self._ranges[0][2]:
                todo.insert(0, self._ranges[0])
        stop, errors = threading.Event(), []

        def work(stream: Iterator[BytesLike] | None) -> None:
            try:
                while not stop.is_set():
                    if stream is not None:
                        self._fetch(self._ranges[0], stream, stop)
                        stream = None
                        continue
                    with self._lock:
                        if not todo:
                            return
                        taken = todo.pop(0)
                    self._fetch(taken, None, stop)
            except BaseException as e:  # raised again by run
                errors.append(e)
                stop.set()
                with self._lock:
                    for cancel in list(self._cancels):
                        cancel()

        threads = [threading.Thread(target=work, args=(None,), daemon=True,
                                    name="dptrain-range")
                   for _ in range(min(self._streams, len(todo) + (first is not None)) - 1)]
        for thread in threads:
            thread.start()
        try:
            work(first)  # catches everything, stopping the others on an error
        finally:
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]

    def _fetch(self, span: list[int], stream: Iterator[BytesLike] | None,
               stop: threading.Event) -> None:
        """Fetch one range from where it stopped, as far as it goes."""
        cancel: Callable[[], object] = lambda: None  # noqa: E731
        if stream is None:
            stream, cancel = self._open_range(span[1], span[2] - span[1])
        with self._lock:
            self._cancels.add(cancel)
            if self._announce:  # the first stream of a resumption is open
                self._announce, self._resumed_at = False, self.done
                if self._report is not None:
                    self._report(self.done, self.done)
        position = [span[1]]
        try:
            with contextlib.closing(stream):  # type: ignore[type-var]
                write_at(self._fd, _until(stream, stop), position, span[2], self._count)
        except ValueError as e:
            raise RangeBroken(f"the range of bytes {span[0]} to {span[2]}: the server sent "
                              f"{e}") from None
        finally:
            span[1] = position[0]
            with self._lock:
                self._cancels.discard(cancel)
        if span[1] < span[2] and not stop.is_set():
            raise RangeBroken(f"the range of bytes {span[0]} to {span[2]}: the stream "
                              f"ended at byte {span[1]}")

    def _count(self, size: int) -> None:
        with self._lock:
            self.done += size
            if self._report is not None:
                self._report(self.done, self._resumed_at)

    def verified(self, algorithm: str) -> tuple[str, int]:
        """Once every range is in: fsync the part, close it and hash it whole.

        Args:
            algorithm: the expected digest's algorithm.

        Returns:
            ``(hex digest, the part's size)``.
        """
        assert self._fd is not None
        os.fsync(self._fd)
        size = os.fstat(self._fd).st_size
        os.close(self._fd)
        self._fd = None
        return hash_file(self.part, algorithm), size

    def close(self) -> None:
        """Give up: cut the part back to the bytes it holds without a gap, sync it and close
        it, for a later call to resume (nothing to do after `verified`)."""
        if self._fd is None:
            return
        kept = next((r[1] for r in self._ranges if r[1] < r[2]), self.size)
        try:
            os.ftruncate(self._fd, kept)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None


def _until(stream: Iterator[BytesLike], stop: threading.Event) -> Iterator[BytesLike]:
    """The stream's chunks until another range's stream failed."""
    for chunk in stream:
        if stop.is_set():
            return
        yield chunk
