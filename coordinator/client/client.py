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
import os
import socket
import ssl
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dptrain.coordinator.api import chunk_wire, serde
from dptrain.coordinator.api.credentials import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    bearer_metadata,
    find_token,
)
from dptrain.coordinator.api.errors import ValidationError
from dptrain.coordinator.api.limits import channel_options
from dptrain.coordinator.api.records import CheckpointRecord, Event, Job, JobState, User
from dptrain.coordinator.client.checkpoint_download import CheckpointDownloads
from dptrain.coordinator.client.data_transfer import tls_context
from dptrain.coordinator.client.download_parts import DownloadedFile, DownloadProgress
from dptrain.coordinator.client.errors import ClientError
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
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


class Client(CheckpointDownloads):
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
