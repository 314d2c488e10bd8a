"""`Client`: the Python client of a dptrain coordinator, one method per RPC.

Results are the coordinator's domain objects (`api.records.Job`, ``Event``,
``CheckpointRecord``), and every failure is a `ClientError` whose message is one readable line
starting with the gRPC status code's name, e.g.
``INVALID_ARGUMENT: optimizer.lr: must be a finite number >= 0, got -0.1``.

Example::

    from dptrain.coordinator.client.client import Client

    with Client("127.0.0.1:50051", token=open("state/token").read().strip()) as client:
        job = client.submit_job("examples/digits_mlp.yaml")
        for item in client.watch_job(job.id):      # the Job first, then its Events
            print(item)
        client.download_checkpoint(job.id, dest="model.safetensors")
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dptrain.atomic_files import fsync_directory
from dptrain.coordinator.api import chunk_wire, serde
from dptrain.coordinator.api.credentials import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    bearer_metadata,
    find_token,
)
from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.api.hashed_io import BytesLike
from dptrain.coordinator.api.limits import channel_options
from dptrain.coordinator.api.records import CheckpointRecord, Event, Job, JobState, User
from dptrain.coordinator.client.data_transfer import (
    DataDownload,
    DataPortUnreachable,
    connect,
    tls_context,
)
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
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.checkpoint_manifest import FileEntry
from dptrain.worker.code_archive import CodeArchiveError, pack_directory
from dptrain.worker.spec import (
    CODE_DIGEST_PREFIX,
    JobSpecError,
    check_types,
    code_digest,
    read_spec_file,
)

__all__ = ["Client", "ClientError", "DownloadedFile", "DownloadProgress", "DEFAULT_TIMEOUT",
           "speaks_tls"]

DEFAULT_TIMEOUT = 30.0

log = logging.getLogger("dptrain.client")


def _download_data(stream: Iterator[Any]) -> Iterator[BytesLike]:
    """The file's bytes from a download stream after its first message."""
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


def speaks_tls(address: str, timeout: float = 5.0) -> bool:
    """Whether the server at ``host:port`` completes a TLS handshake (its certificate not
    checked: this only tells a TLS server from a plaintext one, to say what to pass)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host or None):
                return True
    except (OSError, ValueError):
        return False


def _read_ca(tls_ca: str | os.PathLike | bytes) -> bytes:
    if isinstance(tls_ca, bytes):
        return tls_ca
    try:
        return Path(tls_ca).read_bytes()
    except OSError as e:
        raise ClientError("INVALID_ARGUMENT", f"cannot read the TLS CA certificate: {e}") from None


class Client:
    """A connection to a coordinator (thread-safe; close it, or use it as a context manager).

    Args:
        address: ``host:port``.
        token: a user's token (or a worker token, with `job_id`); default from
            `token_file`, ``$DPTRAIN_TOKEN``, ``$DPTRAIN_TOKEN_FILE`` or ``state_dir/token``
            (see `dptrain.coordinator.api.credentials.find_token`).
        tls_ca: PEM certificate(s) to verify the server's TLS certificate with (a path or the
            bytes); None: a plaintext connection.
        timeout: seconds each unary call may take.
        token_file: a file holding the token.
        state_dir: a local coordinator's state directory to read the token from.
        job_id: the job a worker token belongs to (workers only).
        data_port: move checkpoint bytes over the coordinator's data port where it has one
            (``server.data_port``: plain TCP beside gRPC, faster); False: always the gRPC
            streams. When the port is off, refused or unreachable, this client uses the
            streams from then on (one log line says so).
    """

    def __init__(self, address: str, token: str | None = None,
                 tls_ca: str | os.PathLike | bytes | None = None,
                 timeout: float = DEFAULT_TIMEOUT, *, token_file: str | os.PathLike | None = None,
                 state_dir: str | os.PathLike | None = None, job_id: str | None = None,
                 data_port: bool = True):
        self.address = address
        self.timeout = timeout
        self.data_port = data_port
        try:
            token, self.token_source = find_token(token, token_file=token_file,
                                                  state_dir=state_dir)
        except (OSError, ValueError) as e:
            raise ClientError("UNAUTHENTICATED", f"cannot read the token: {e}") from None
        self.tls = tls_ca is not None
        self._metadata = bearer_metadata(token, job_id)
        self._data_tls = None
        if tls_ca is not None:
            ca = _read_ca(tls_ca)
            self._data_tls = tls_context(ca)
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            self.channel = grpc.secure_channel(address, credentials, options=channel_options())
        else:
            self.channel = grpc.insecure_channel(address, options=channel_options())
        self._stub = pb_grpc.CoordinatorStub(self.channel)
        self._worker_stub = pb_grpc.WorkerServiceStub(self.channel)
        self._download = chunk_wire.download_stub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the connection (open streams end)."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, error: grpc.RpcError) -> ClientError:
        code = error.code() if hasattr(error, "code") else None
        name = code.name if code is not None else "UNKNOWN"
        details = (error.details() if hasattr(error, "details") else None) or str(error)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            which = "another" if self._metadata else "one"
            details = (f"{details} (sent {self.token_source}; pass {which} with --token-file "
                       f"FILE, ${TOKEN_ENV} or ${TOKEN_FILE_ENV})")
        elif code is grpc.StatusCode.UNAVAILABLE and (tls := self._tls_advice(details)):
            details = tls
        elif code is grpc.StatusCode.UNAVAILABLE:
            details = f"cannot reach the coordinator at {self.address}: {details}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"no answer from the coordinator at {self.address} in time: {details}"
        return ClientError(name, details)

    def _tls_advice(self, details: str) -> str | None:
        """What to do when the connection failed over TLS: a handshake that failed (e.g. a
        self-signed server, verified without its CA), or a TLS server spoken to in plaintext;
        None when TLS is not the trouble."""
        if self.tls:
            if "handshake" not in details.lower() and "ssl" not in details.lower():
                return None
            return (f"the TLS handshake with the coordinator at {self.address} failed: pass "
                    f"the CA certificate that signed its certificate with --tls-ca PEM (or "
                    f"$DPTRAIN_TLS_CA; dptrain tls init wrote it as ca.pem) ({details})")
        if not speaks_tls(self.address):
            return None
        return (f"the coordinator at {self.address} serves TLS and this client spoke "
                f"plaintext: pass its CA certificate with --tls-ca PEM (or $DPTRAIN_TLS_CA; "
                f"dptrain tls init wrote it as ca.pem)")

    def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata,
                          timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _stream(self, method: Any, request: Any, timeout: float | None = None) -> Iterator[Any]:
        call = method(request, metadata=self._metadata, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()

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
        if first.info.data.port:
            call.cancel()
            try:
                sock = self._data_connection(first.info.data)
            except DataPortUnreachable:
                return self._open_download(request)  # over the stream, now
            bytes_ = DataDownload(sock, first.info.end - request.offset)
            return first.info, iter(bytes_), bytes_.cancel

        def chunks() -> Iterator[BytesLike]:
            try:
                yield from _download_data(call)
            except grpc.RpcError as e:
                raise self._error(e) from None
            finally:
                call.cancel()

        return first.info, chunks(), call.cancel

    # ------------------------------------------------------------ jobs

    def submit_job(self, spec: Mapping[str, Any] | Any | str | os.PathLike, priority: int = 0,
                   max_restarts: int | None = None, time_limit: float | None = None) -> Job:
        """Submit a job.

        A spec naming ``code: DIR`` (relative to the job file, or to the current directory
        for a mapping) ships that directory: it is packed (`worker.code_archive`), uploaded
        once (`upload_code`) and the job names it by its digest, ``code: "sha256:..."``.

        Args:
            spec: a job file's path, its data (a mapping), or a ``worker.spec.JobSpec``.
            priority: higher runs first.
            max_restarts: restarts after worker failures; None: the server's default.
            time_limit: seconds per run (lets smaller jobs backfill); None: unknown.

        Returns:
            The queued job.

        Raises:
            ClientError: INVALID_ARGUMENT naming the field at fault, UNAUTHENTICATED, ...
        """
        if hasattr(spec, "to_dict"):
            spec = spec.to_dict()
        base = "."
        try:  # fields and types checked here; the rules, by the coordinator (it knows the models)
            if isinstance(spec, (str, os.PathLike)):
                base = os.path.dirname(os.path.abspath(os.fspath(spec)))
                spec = read_spec_file(spec)
            check_types(spec)
            code = spec.get("code")
            if code is not None and code_digest(code) is None:
                packed = pack_directory(os.path.join(base, code))
                spec = {**spec, "code": CODE_DIGEST_PREFIX + self.upload_code(packed.data)}
        except (JobSpecError, CodeArchiveError) as e:
            raise ClientError("INVALID_ARGUMENT", str(e)) from None
        try:
            request = serde.submit_request_to_proto(spec, priority, max_restarts, time_limit)
        except ValidationError as e:
            raise ClientError("INVALID_ARGUMENT", str(e)) from None
        return serde.job_from_proto(self._unary(self._stub.SubmitJob, request))

    def upload_code(self, archive: bytes, chunk_size: int = 1 << 20) -> str:
        """Store a code archive on the coordinator (``worker.code_archive.pack_directory``
        makes one); storing the same bytes again is a no-op.

        Args:
            archive: the archive's bytes.
            chunk_size: bytes per message.

        Returns:
            Its sha256, for a spec's ``code: "sha256:<digest>"``.

        Raises:
            ClientError: INVALID_ARGUMENT (an unsafe archive), RESOURCE_EXHAUSTED (over the
                server's limit), PERMISSION_DENIED (a worker token), ...
        """
        sha256 = hashlib.sha256(archive).hexdigest()
        messages = itertools.chain(
            [pb.UploadCodeRequest(header=pb.CodeArchive(sha256=sha256, size=len(archive)))],
            (pb.UploadCodeRequest(chunk=archive[i:i + chunk_size])
             for i in range(0, len(archive), chunk_size)))
        return self._unary(self._stub.UploadCode, messages, timeout=max(self.timeout, 600.0)
                           ).sha256

    def get_job(self, job_id: str) -> Job:
        """The job with this id (NOT_FOUND when there is none)."""
        return serde.job_from_proto(self._unary(self._stub.GetJob,
                                                pb.GetJobRequest(job_id=job_id)))

    def list_jobs(self, states: Iterable[JobState | str] | None = None, page_size: int = 0,
                  page_token: str = "", owner: str = "") -> tuple[list[Job], str]:
        """One page of jobs, newest first: a user's own; an admin's, everyone's.

        Args:
            states: only jobs in these states (None: all).
            page_size: at most this many (0: the server's default, 100).
            page_token: "" for the first page, else the token the previous page returned.
            owner: only this user's jobs (another user's: admins only); "" for all you see.

        Returns:
            ``(jobs, next_page_token)``; the token is "" on the last page.
        """
        request = pb.ListJobsRequest(states=[serde.state_to_proto(s) for s in states or ()],
                                     page_size=page_size, page_token=page_token, owner=owner)
        response = self._unary(self._stub.ListJobs, request)
        return [serde.job_from_proto(j) for j in response.jobs], response.next_page_token

    def iter_jobs(self, states: Iterable[JobState | str] | None = None,
                  page_size: int = 100, owner: str = "") -> Iterator[Job]:
        """Every job (in these states, of `owner`), newest first, a page at a time."""
        states = list(states or ())
        token = ""
        while True:
            page, token = self.list_jobs(states, page_size, token, owner)
            yield from page
            if not token:
                return

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a job; returns it, CANCELLED, or CANCELLING while a running job's workers stop
        and checkpoint (FAILED_PRECONDITION when it already ended)."""
        return serde.job_from_proto(self._unary(self._stub.CancelJob,
                                                pb.CancelJobRequest(job_id=job_id)))

    def delete_job(self, job_id: str) -> Job:
        """Delete a finished job with its logs and the checkpoint files no other job uses;
        returns the job as it was (FAILED_PRECONDITION while it has not finished)."""
        return serde.job_from_proto(self._unary(self._stub.DeleteJob,
                                                pb.DeleteJobRequest(job_id=job_id)))

    def watch_job(self, job_id: str, after_seq: int = 0) -> Iterator[Job | Event]:
        """Follow a job: first the `Job` as it is now, then its `Event`s after `after_seq`.

        The iterator ends when the job has reached a final state; closing it ends the stream.

        Args:
            job_id: the job.
            after_seq: skip events up to this sequence number (0: from the start).

        Yields:
            A `Job`, then `Event` objects (state changes, metrics, log lines, checkpoints).
        """
        request = pb.WatchJobRequest(job_id=job_id, after_seq=after_seq)
        for message in self._stream(self._stub.WatchJob, request):
            if message.WhichOneof("item") == "job":
                yield serde.job_from_proto(message.job)
            else:
                yield serde.event_from_proto(message.event)

    # ------------------------------------------------------------ checkpoints

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """A job's stored checkpoints, oldest step first (manifest: step, epoch, metrics,
        ``files: {name: {blake3 or sha256, bytes}}``)."""
        response = self._unary(self._stub.ListCheckpoints,
                               pb.ListCheckpointsRequest(job_id=job_id))
        return [serde.checkpoint_from_proto(c) for c in response.checkpoints]

    def keep_checkpoint(self, job_id: str, step: int, keep: bool = True) -> CheckpointRecord:
        """Mark a checkpoint so that retention never deletes it (`keep` False: unmark it);
        returns the checkpoint."""
        return serde.checkpoint_from_proto(self._unary(
            self._stub.KeepCheckpoint, pb.KeepCheckpointRequest(job_id=job_id, step=step,
                                                                keep=keep)))

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

    # ------------------------------------------------------------ users (admins only)

    def create_user(self, name: str, admin: bool = False) -> tuple[User, str]:
        """Create a user; returns it and its first token (the only copy of the token)."""
        reply = self._unary(self._stub.CreateUser, pb.CreateUserRequest(name=name, admin=admin))
        return serde.user_from_proto(reply.user), reply.token

    def issue_token(self, name: str) -> tuple[User, str]:
        """A new token for a user, replacing its previous one; returns the user and token."""
        reply = self._unary(self._stub.IssueToken, pb.IssueTokenRequest(name=name))
        return serde.user_from_proto(reply.user), reply.token

    def revoke_user(self, name: str) -> User:
        """Revoke a user's token (its jobs stay); `issue_token` makes it active again."""
        return serde.user_from_proto(self._unary(self._stub.RevokeUser,
                                                 pb.RevokeUserRequest(name=name)))

    def list_users(self) -> list[User]:
        """Every user, by name."""
        return [serde.user_from_proto(u)
                for u in self._unary(self._stub.ListUsers, pb.ListUsersRequest()).users]

    # ------------------------------------------------------------ health

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health: ``SERVING``, ``NOT_SERVING`` (shutting down), ...

        Args:
            service: "" for the server, or a service name like ``dptrain.v1.Coordinator``.
            timeout: seconds to wait (default: the client's timeout).

        Returns:
            The status's name.
        """
        response = self._unary(self._health.Check,
                               health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
