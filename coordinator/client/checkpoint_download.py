"""`CheckpointDownloads`: how `client.Client` downloads a checkpoint file, resumably, over the
coordinator's data port (``client.data_transfer``) or a DownloadCheckpoint stream's chunks,
into a part file verified before it is renamed into place (``client.download_parts``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from dptrain.atomic_files import fsync_directory
from dptrain.coordinator.api import chunk_wire, serde
from dptrain.coordinator.api.hashed_io import BytesLike
from dptrain.coordinator.client.data_transfer import DataDownload, DataPortUnreachable, connect
from dptrain.coordinator.client.download_parts import (
    DOWNLOAD_STREAMS,
    FIRST_RANGE_BYTES,
    DownloadedFile,
    DownloadProgress,
    RangeBroken,
    RangedDownload,
    append_to_part,
    part_path,
    part_size,
)
from dptrain.coordinator.client.errors import ClientError
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.worker.checkpoint_manifest import FileEntry

__all__ = ["CheckpointDownloads", "download_data"]

log = logging.getLogger("dptrain.client")


def download_data(stream: Iterator[Any]) -> Iterator[BytesLike]:
    """The file's bytes from a DownloadCheckpoint stream after its first message."""
    for item in stream:
        if isinstance(item, chunk_wire.Chunk):
            yield item.data
        elif item.WhichOneof("item") == "chunk":  # a sender encoding its own way
            yield item.chunk
        else:
            raise ClientError("INTERNAL", "the download stream described its file twice")


#: The status codes of a download stream that broke on the way (the coordinator restarting or
#: shutting down, a dropped connection), which `Client.download_checkpoint` resumes.
_RESUMABLE = frozenset({"UNAVAILABLE", "CANCELLED", "ABORTED"})
_BACKOFF_S, _MAX_BACKOFF_S = 0.25, 8.0


class CheckpointDownloads:
    """`Client`'s checkpoint downloads. It provides ``address``, ``timeout``, ``data_port``,
    ``_data_tls`` (None, or the data port's TLS context), ``_metadata``, ``_download`` (the
    DownloadCheckpoint stub of `api.chunk_wire`) and ``_error``."""

    address: str
    timeout: float
    data_port: bool
    _data_tls: Any
    _metadata: tuple
    _download: Callable[..., Any]
    _error: Callable[[grpc.RpcError], ClientError]

    def _data_connection(self, ticket: pb.DataTicket) -> socket.socket:
        """An accepted connection to the data port on the host gRPC reaches.

        Raises:
            DataPortUnreachable: after switching this client to the gRPC streams.
            ClientError: the server refused the ticket.
        """
        host = self.address.rpartition(":")[0].strip("[]")
        try:
            return connect(host, ticket.port, ticket.ticket, self._data_tls,
                           max(self.timeout, 60.0))
        except DataPortUnreachable as e:
            self._use_streams(f"its data port is unreachable ({e})")
            raise

    def _offered(self, ticket: pb.DataTicket) -> bool:
        """Whether the server answered with a data port ticket; if not (it has no data port,
        or predates it: chunks follow), this client uses the gRPC streams from now on."""
        if not ticket.port:
            self._use_streams("it has no data port")
        return bool(ticket.port)

    def _use_streams(self, why: str) -> None:
        """Move checkpoint bytes over the gRPC streams from now on."""
        if self.data_port:
            self.data_port = False
            log.warning("coordinator %s: %s; checkpoint transfers use the gRPC streams",
                        self.address, why)

    def _open_download(self, request: pb.DownloadCheckpointRequest
                       ) -> tuple[pb.DownloadInfo, Iterator[BytesLike], Callable[[], Any]]:
        """Start a DownloadCheckpoint: ``(its description, the file's bytes, cancel)``. The
        bytes come from the data port when the server hands out a ticket, else as the
        stream's chunks; the caller cannot tell them apart.

        Raises:
            ClientError: the call failed, or did not start with the file's description.
        """
        request.data_port = self.data_port
        call = self._download(request, metadata=self._metadata)
        try:
            first = next(call, None)
        except grpc.RpcError as e:
            raise self._error(e) from None
        if first is None or first.WhichOneof("item") != "info":
            call.cancel()
            raise ClientError("INTERNAL", "the download stream did not start with the file's "
                              "description")
        if self._offered(first.info.data):
            call.cancel()
            try:
                sock = self._data_connection(first.info.data)
            except DataPortUnreachable:
                return self._open_download(request)  # over the stream, now
            bytes_ = DataDownload(sock, first.info.end - request.offset)
            return first.info, iter(bytes_), bytes_.cancel

        def chunks() -> Iterator[BytesLike]:
            try:
                yield from download_data(call)
            except grpc.RpcError as e:
                raise self._error(e) from None
            finally:
                call.cancel()

        return first.info, chunks(), call.cancel

    def download_checkpoint(self, job_id: str, step: int | None = None,
                            file: str = "model.safetensors",
                            dest: str | os.PathLike | None = None, *, retries: int = 8,
                            on_progress: Callable[[DownloadProgress], None] | None = None,
                            streams: int = DOWNLOAD_STREAMS) -> DownloadedFile:
        """Download one file of a checkpoint, verifying its digest before it appears at `dest`;
        an interrupted download resumes where it stopped.

        The bytes go to a part file beside `dest` (``.NAME.<digest>.part``, synced as it
        grows). When the stream breaks (the coordinator restarting, a dropped connection:
        UNAVAILABLE, CANCELLED, ABORTED), the same checkpoint is asked for again from the part's
        size, backing off between tries, up to `retries` tries in a row without progress; a
        part left by an earlier call for the same file is resumed too. At the end the whole
        file is hashed (the part read back, the rest as it arrives: BLAKE3, or sha256 for a
        checkpoint written before BLAKE3) and compared with the digest of the checkpoint's
        manifest: only a match is renamed to `dest`; a mismatch deletes the part (DATA_LOSS).
        The server does not hash the bytes as it sends them: this check is the one that counts.

        The bytes come over the coordinator's data port where it has one (the first answer
        carries a ticket for them, ``client.data_transfer``), else as the stream's chunks;
        resuming, ranges and the check are the same either way.

        With `streams` > 1, a file larger than `FIRST_RANGE_BYTES` comes over that many
        streams at once, each fetching byte ranges into the part (`client.download_parts`),
        and is hashed whole once all are in; a server that predates ranges sends it over the
        first stream.

        Args:
            job_id: the job.
            step: the checkpoint's step; None: the newest intact one (then pinned for resuming).
            file: ``model.safetensors``, ``optimizer.safetensors`` or ``manifest.json``.
            dest: the file to write, or a directory to write `file` into (default: `file` in
                the current directory).
            retries: tries in a row that receive nothing before giving up (the part is kept
                for a later call).
            on_progress: called after each chunk (and once at each start or resumption).
            streams: streams at once (1, the default: one stream, hashing the bytes as they
                arrive).

        Returns:
            Where it went, with its step, size and digest.

        Raises:
            ClientError: NOT_FOUND, DATA_LOSS (the bytes received fail the digest), ...
        """
        target = Path(file if dest is None else dest)
        if target.is_dir():
            target = target / file
        expected: FileEntry | None = None  # the file being fetched, from the first answer
        ranged: RangedDownload | None = None  # its ranges, when they come over several streams
        failures = 0

        def report(done: int, resumed_at: int | None) -> None:
            if on_progress is not None:
                on_progress(DownloadProgress(expected.name, step, expected.size, done,
                                             resumed_at))

        def open_range(offset: int, length: int) -> tuple[Iterator[BytesLike], Callable]:
            return self._open_range(job_id, step, file, expected, offset, length)

        try:
            while True:
                part = None if expected is None else part_path(target, expected)
                offset = part_size(part) if part is not None else 0
                before = offset if ranged is None else ranged.done
                try:
                    if ranged is not None:  # a try after a break: each range goes on
                        ranged.run()
                        digest, size = ranged.verified(expected.algorithm)
                    else:
                        request = pb.DownloadCheckpointRequest(
                            job_id=job_id, file=file, offset=offset,
                            length=FIRST_RANGE_BYTES if streams > 1 else 0)
                        if step is not None:
                            request.step = step
                        info, data, cancel = self._open_download(request)
                        try:
                            described = serde.file_entry_from_proto(info.file)
                            if described != expected:  # the first answer, or another file
                                if expected is not None:
                                    part_path(target, expected).unlink(missing_ok=True)
                                expected, step = described, info.step
                                part = part_path(target, expected)
                                if part_size(part) > expected.size:
                                    part.unlink()
                                if offset != part_size(part):  # a part to resume (or none now)
                                    continue
                            report(offset, offset or None)
                            if streams > 1 and offset < info.end < expected.size:
                                ranged = RangedDownload(part, expected.size, offset, info.end,
                                                        streams, open_range, report)
                                ranged.run(data)
                                digest, size = ranged.verified(expected.algorithm)
                            else:  # one stream (or a server that predates ranges)
                                digest, size = append_to_part(part, expected, offset, data,
                                                              report)
                        finally:
                            cancel()
                except ClientError as e:
                    if e.code not in _RESUMABLE:
                        raise
                    now = (part_size(part_path(target, expected)) if ranged is None
                           else ranged.done) if expected is not None else 0
                    failures = 0 if now > before else failures + 1
                    if failures > retries:
                        raise
                    time.sleep(min(_BACKOFF_S * 2 ** failures, _MAX_BACKOFF_S))
                    continue
                except RangeBroken as e:
                    part.unlink(missing_ok=True)
                    raise ClientError("DATA_LOSS", f"{expected.name} of step {step}: {e}"
                                      ) from None
                if digest != expected.digest or size != expected.size:
                    part.unlink(missing_ok=True)
                    raise ClientError("DATA_LOSS", f"{expected.name} of step {step}: received "
                                      f"{size} bytes hashing to {expected.algorithm} {digest}, "
                                      f"expected {expected.size} bytes with "
                                      f"{expected.algorithm} {expected.digest}")
                os.replace(part, target)
                fsync_directory(target.parent)
                return DownloadedFile(target, step, expected.name, size, expected.digest,
                                      expected.algorithm)
        finally:
            if ranged is not None:
                ranged.close()  # a part without gaps for a later call to resume (or none)

    def _open_range(self, job_id: str, step: int, file: str, expected: FileEntry, offset: int,
                    length: int) -> tuple[Iterator[BytesLike], Callable[[], Any]]:
        """A stream of `length` bytes of the file from `offset`: ``(chunks, cancel)``.

        Raises:
            ClientError: the call failed, or ABORTED: the stream describes another file
                or range (the checkpoint was replaced meanwhile).
        """
        request = pb.DownloadCheckpointRequest(job_id=job_id, step=step, file=file,
                                               offset=offset, length=length)
        info, data, cancel = self._open_download(request)
        if (info.step != step or serde.file_entry_from_proto(info.file) != expected
                or info.end != offset + length):
            cancel()
            raise ClientError("ABORTED", f"{expected.name} of step {step} changed during the "
                              f"download")
        return data, cancel
