"""A job's worker token as a client: the ``WorkerService`` calls a rank makes (progress
reports, heartbeats, checkpoint uploads, and fetching the job's code and its latest checkpoint),
each transfer verified by its digest. The reporter policy built on it (buffering, retries,
heartbeats) is `dptrain.coordinator.client.worker_reporter`'s.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dptrain.coordinator.api import chunk_wire, serde
from dptrain.coordinator.api.checkpoint_upload import CheckpointUpload, read_checkpoint_directory
from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.api.hashed_io import write_hashed
from dptrain.coordinator.api.records import CheckpointRecord, EventKind, JobState
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.client.data_transfer import (
    DataPortUnreachable,
    fetched_files,
    send_upload,
)
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.worker.checkpoint_manifest import (
    MANIFEST,
    CheckpointError,
    checkpoint_name,
    new_hasher,
    verify_checkpoint,
)
from dptrain.worker.code_archive import CodeArchiveError, unpack_archive
from dptrain.worker.environment import read_worker_environment

__all__ = ["WorkerClient"]


class WorkerClient(Client):
    """A `Client` holding a job's worker token, with the ``WorkerService`` calls.

    Args:
        address: the coordinator's ``host:port``.
        job_id: the job.
        token: its worker token.
        tls_ca: the CA certificate path (None: plaintext).
        timeout: seconds each unary call may take.
        data_port: upload and download over the coordinator's data port where it has one
            (`Client`); False: the gRPC streams.
    """

    def __init__(self, address: str, job_id: str, token: str,
                 tls_ca: str | os.PathLike | None = None, timeout: float = 10.0, *,
                 data_port: bool = True):
        super().__init__(address, token=token, tls_ca=tls_ca, timeout=timeout, job_id=job_id,
                         data_port=data_port)
        self.job_id = job_id

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> WorkerClient:
        """A client configured by the variables of `dptrain.worker.environment`.

        Raises:
            KeyError: a required variable is missing.
        """
        env = read_worker_environment(environ)
        return cls(env.address, env.job_id, env.token, env.tls_ca)

    def report_progress(self, items: Iterable[tuple[EventKind | str, Mapping[str, Any]]]) -> int:
        """Send a batch of ``(kind, payload)`` events (``metrics`` or ``log``).

        Returns:
            The sequence number of the last event stored.
        """
        request = pb.ReportProgressRequest(
            job_id=self.job_id, events=[serde.worker_event_to_proto(k, p) for k, p in items])
        return self._unary(self._worker_stub.ReportProgress, request).last_seq

    def heartbeat(self) -> JobState:
        """Tell the coordinator that training made progress; returns the job's state."""
        response = self._unary(self._worker_stub.Heartbeat,
                               pb.HeartbeatRequest(job_id=self.job_id))
        return serde.state_from_proto(response.state)

    def upload_checkpoint(self, path: str | os.PathLike, timeout: float | None = 3600.0,
                          on_chunk: Callable[[int], None] | None = None) -> CheckpointRecord:
        """Upload a checkpoint directory written by ``worker.checkpoint.write_checkpoint``:
        over the coordinator's data port where it has one (OpenCheckpointUpload, then the
        files' bytes with ``sendfile``), else over the UploadCheckpoint stream; either way
        with the same checks and errors.

        Args:
            path: the directory (``step-XXXXXXXX``).
            timeout: seconds the whole upload may take.
            on_chunk: called with each chunk's size as it is read.

        Returns:
            The record the coordinator stored.

        Raises:
            ClientError: DATA_LOSS (a file changed since its manifest was written),
                RESOURCE_EXHAUSTED (too large), FAILED_PRECONDITION (the job is over), ...
            OSError, ValueError: the manifest cannot be read.
        """
        header, chunks = read_checkpoint_directory(self.job_id, path, on_chunk)
        if self.data_port:
            stored = self._upload_to_data_port(Path(path), header, on_chunk, timeout)
            if stored is not None:
                return stored

        def requests() -> Iterator[pb.UploadCheckpointRequest | chunk_wire.Chunk]:
            yield pb.UploadCheckpointRequest(header=serde.upload_header_to_proto(header))
            for name, data in chunks:
                yield chunk_wire.Chunk(name, data)

        response = self._unary(chunk_wire.upload_stub(self.channel), requests(), timeout)
        return serde.checkpoint_from_proto(response)

    def _upload_to_data_port(self, path: Path, header: CheckpointUpload,
                             on_chunk: Callable[[int], None] | None,
                             timeout: float | None) -> CheckpointRecord | None:
        """`upload_checkpoint` over the data port: OpenCheckpointUpload checks the header and
        hands out a ticket, the files follow over the port (``sendfile``). None when the
        server has no data port or it cannot be reached (the gRPC stream's turn)."""
        try:
            ticket = self._unary(self._worker_stub.OpenCheckpointUpload,
                                 serde.upload_header_to_proto(header))
        except ClientError as e:
            # A server that predates the data port: UNIMPLEMENTED, or PERMISSION_DENIED from
            # an access table without the RPC (UploadCheckpoint gives any real refusal again).
            if e.code not in ("UNIMPLEMENTED", "PERMISSION_DENIED"):
                raise
            self._use_streams(f"it does not take uploads over a data port ({e.code})")
            return None
        if not self._offered(ticket):
            return None
        try:
            sock = self._data_connection(ticket)
        except DataPortUnreachable:
            return None
        with sock:
            sock.settimeout(timeout)
            body = send_upload(sock, path, header.files, on_chunk)
        return serde.checkpoint_from_proto(pb.Checkpoint.FromString(body))

    def fetch_code(self, sha256: str, target: str | os.PathLike) -> str:
        """Download the job's code archive, verify its sha256 and unpack it into `target`
        (``worker.code_archive.unpack_archive``: nothing is written outside it).

        Args:
            sha256: the digest the job's spec names.
            target: the directory to create (kept when it exists: the same archive's).

        Returns:
            `target`.

        Raises:
            ClientError: the transfer failed.
            CodeArchiveError: the bytes fail the sha256 (the message starts ``DATA_LOSS:``),
                or the archive is not a safe code archive.
        """
        target = Path(target)
        if target.is_dir():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        stream = self._stream(self._worker_stub.FetchCode,
                              pb.FetchCodeRequest(job_id=self.job_id), timeout=3600.0)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".code-", suffix=".tar.gz")
        try:
            try:
                serde.code_header_from_upload(next(stream, None))
                with os.fdopen(fd, "wb") as f:
                    got, _ = write_hashed(serde.code_chunks(stream), f, "sha256")
            except ValidationError as e:
                raise ClientError("INTERNAL", f"the code stream is malformed: {e}") from None
            if got != sha256:  # the one check of the archive's bytes: the server sends
                # them unhashed. A damaged stored archive fails every launch alike, so this is
                # the job's fault (exit 2, no restart), not a transient transfer error.
                raise CodeArchiveError(f"DATA_LOSS: the code archive sha256:{sha256} arrived "
                                       f"hashing to sha256 {got}: damaged on the "
                                       "coordinator's disk or on the way; upload the code "
                                       "again and resubmit")
            return unpack_archive(tmp, target)
        finally:
            stream.close()
            Path(tmp).unlink(missing_ok=True)

    def fetch_checkpoint(self, dest_dir: str | os.PathLike) -> str | None:
        """Download the job's newest intact checkpoint as ``dest_dir/step-XXXXXXXX``: its
        files' bytes over the coordinator's data port where it has one (the stream's header
        carries a ticket for them), else as the FetchCheckpoint stream's chunks.

        Files are written into a temporary directory, checked against their digests and by
        ``worker.checkpoint_manifest.verify_checkpoint``, and renamed into place (replacing a
        damaged copy of the same step). An identical intact copy already there is kept as it is.

        Args:
            dest_dir: the worker's checkpoint directory (created if missing).

        Returns:
            The checkpoint's directory, or None when the job has no intact checkpoint.

        Raises:
            ClientError: the transfer failed, or DATA_LOSS when a file fails its digest.
        """
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        request = pb.FetchCheckpointRequest(job_id=self.job_id, data_port=self.data_port)
        stream = self._stream(chunk_wire.fetch_stub(self.channel), request, timeout=3600.0)
        try:
            try:
                first = next(stream, None)
            except ClientError as e:
                if e.code == "NOT_FOUND":
                    return None
                raise
            if (first is None or isinstance(first, chunk_wire.Chunk)
                    or first.WhichOneof("item") != "header"):
                raise ClientError("INTERNAL", "the fetch stream did not start with a header")
            header = serde.upload_header_from_proto(first.header)
            final = dest / checkpoint_name(header.step)
            try:
                if (final / MANIFEST).read_bytes() == header.manifest_json:
                    verify_checkpoint(final)
                    return str(final)
            except (OSError, CheckpointError):
                pass  # absent or damaged here: download it
            # (A ticket left unused above expires on the server within a minute.)
            if self._offered(first.data):
                stream.close()
                try:
                    chunks = fetched_files(self._data_connection(first.data), header.files)
                except DataPortUnreachable:
                    return self.fetch_checkpoint(dest_dir)  # over the stream, now
            else:
                chunks = serde.chunks_from_upload(stream)
            tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".fetch-"))
            try:
                _write_files(header, chunks, tmp)
                (tmp / MANIFEST).write_bytes(header.manifest_json)
                verify_checkpoint(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except ValidationError as e:
                raise ClientError("INTERNAL", f"bad fetch stream: {e}") from None
            except CheckpointError as e:
                raise ClientError("DATA_LOSS", f"the fetched checkpoint is unusable: {e}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return str(final)
        finally:
            stream.close()


def _write_files(header: CheckpointUpload, chunks: Iterable[tuple[str, bytes]],
                 directory: Path) -> None:
    """Write the fetched files into `directory`, checking each against the header."""
    expected = {f.name: f for f in header.files}
    for name in expected:
        if name in ("", ".", "..", MANIFEST) or Path(name).name != name:
            raise ClientError("INTERNAL", f"the fetch stream names a bad file {name!r}")
    written: dict[str, tuple[str, int]] = {}
    for name, group in itertools.groupby(chunks, key=lambda chunk: chunk[0]):
        if name not in expected or name in written:
            raise ClientError("INTERNAL", f"unexpected chunk of {name!r} in the stream")
        with open(directory / name, "wb") as f:
            written[name] = write_hashed((data for _, data in group), f,
                                         expected[name].algorithm)
    for name, entry in expected.items():
        if name not in written and entry.size == 0:  # an empty file has no chunks
            (directory / name).write_bytes(b"")
            written[name] = (new_hasher(entry.algorithm).hexdigest(), 0)
        got = written.get(name)
        if got != (entry.digest, entry.size):
            raise ClientError("DATA_LOSS", f"{name}: received {got[1] if got else 0} bytes "
                              f"hashing to {got[0] if got else 'nothing'}, expected "
                              f"{entry.size} bytes with {entry.algorithm} {entry.digest}")
