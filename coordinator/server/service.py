"""The gRPC servicers: thin. Each method decodes its request (`api.serde`), calls the
plain logic (`server.jobs`, `server.checkpoint_store`) with the server's `ServiceState`, and
encodes the answer; any error becomes ``context.abort(code, one-line message)``, the code taken
from the error's class (`coordinator.errors.status_name`, or its ``status`` attribute).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.chunk_wire import Chunk
from dptrain.coordinator.api.errors import ValidationError, status_name
from dptrain.coordinator.api.limits import MAX_ERROR_MESSAGE
from dptrain.coordinator.api.records import Job
from dptrain.coordinator.server import checkpoint_store as checkpoints
from dptrain.coordinator.server import code_store, jobs, retention, users
from dptrain.coordinator.server.access import Principal
from dptrain.coordinator.server.auth import WORKER_SERVICE, AuthInterceptor
from dptrain.coordinator.server.job_messages import JobMessages
from dptrain.coordinator.server.jobs import ServiceState
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.spec import cut

if TYPE_CHECKING:
    from dptrain.coordinator.server.data_port import DataPort

__all__ = ["CoordinatorServicer", "WorkerServicer", "status_of", "one_line", "answer_of"]

log = logging.getLogger("dptrain.coordinator")


def status_of(error: BaseException) -> grpc.StatusCode:
    """The status code an error aborts a call with.

    Args:
        error: any exception.

    Returns:
        Its class's ``status`` attribute, else `status_name`'s mapping (INTERNAL by default).
    """
    return getattr(grpc.StatusCode, getattr(error, "status", None) or status_name(error))


def one_line(error: BaseException) -> str:
    """The error's message as one line of at most `MAX_ERROR_MESSAGE` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return cut(text, MAX_ERROR_MESSAGE)


def answer_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """What a call that `error` ended answers: its status code and one-line message. An
    INTERNAL error (a fault of the server, not of the request) is logged with its traceback
    here (call it inside the ``except``) and its message names its type.
    """
    code, message = status_of(error), one_line(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
        message = f"internal error: {type(error).__name__}: {message}"
    return code, message


@contextlib.contextmanager
def _aborting(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn any exception inside into ``context.abort`` with its code and one-line message.

    ``BaseException``: gRPC's thread catches only ``Exception``, so a ``SystemExit`` escaping a
    handler would end the call without an answer; only a stream's closing passes through.
    """
    try:
        yield
    except GeneratorExit:
        raise
    except BaseException as e:
        context.abort(*answer_of(e))


_COORDINATOR = "/dptrain.v1.Coordinator/"


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """``dptrain.v1.Coordinator``: a user acts on its own jobs, an admin on all
    (`server.access`; the interceptor has already refused callers outside each RPC's rule).

    Args:
        state: the server's state.
        auth: the server's authenticator (who is calling).
        data_port: the data port that tickets are issued for; None: none (chunks only).
    """

    def __init__(self, state: ServiceState, auth: AuthInterceptor,
                 data_port: DataPort | None = None):
        self.state = state
        self.auth = auth
        self.data_port = data_port
        self.jobs = JobMessages(state.store)

    def _caller(self, context: Any, method: str) -> Principal:
        return self.auth.principal(context.invocation_metadata(), _COORDINATOR + method)

    def _owned_job(self, context: Any, method: str, job_id: str) -> tuple[Job, pb.Job]:
        """The job and its message, once the caller is its owner or an admin (NOT_FOUND
        first)."""
        job, message = self.jobs.get(job_id)
        self._caller(context, method).require_owner(job)
        return job, message

    def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.Job:
        """Validate and queue a job (`jobs.submit_job`), owned by the caller."""
        with _aborting(context):
            owner = self._caller(context, "SubmitJob").user
            job = jobs.prepare_job(serde.submit_request_from_proto(request), self.state,
                                   owner=owner)
            # The reply first: a job whose reply fails is never stored.
            spec = serde.spec_to_proto(job.spec)
            reply = serde.job_to_proto(job, spec)
            jobs.queue_job(job, self.state)
            self.jobs.specs.put(job.id, spec)
            return reply

    def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        """One job: the store's record, its message kept while the job is unchanged
        (`server.job_messages`)."""
        with _aborting(context):
            return self._owned_job(context, "GetJob", request.job_id)[1]

    def ListJobs(self, request: pb.ListJobsRequest,
                 context: Any) -> pb.ListJobsResponse:
        """A page of jobs (`jobs.list_jobs`): a user's own, or an admin's choice; kept while
        no job is written (`server.job_messages`)."""
        with _aborting(context):
            wanted = serde.list_request_from_proto(request)
            owner = self._caller(context, "ListJobs").list_owner(wanted.owner)
            wanted = dataclasses.replace(wanted, owner=owner or "")
            return self.jobs.page(wanted, lambda: jobs.list_jobs(wanted, self.state))

    def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.Job:
        """Cancel a job (`jobs.cancel_job`)."""
        with _aborting(context):
            self._owned_job(context, "CancelJob", request.job_id)
            return self.jobs.message(jobs.cancel_job(request.job_id, self.state))

    def WatchJob(self, request: pb.WatchJobRequest,
                 context: Any) -> Iterator[pb.WatchJobResponse]:
        """The job, then its events as they happen (`jobs.watch_job`)."""
        with _aborting(context):
            self._owned_job(context, "WatchJob", request.job_id)
            for item in jobs.watch_job(request.job_id, request.after_seq, self.state,
                                       is_active=context.is_active):
                if isinstance(item, Job):
                    yield pb.WatchJobResponse(job=self.jobs.message(item))
                else:
                    yield pb.WatchJobResponse(event=serde.event_to_proto(item))

    def ListCheckpoints(self, request: pb.ListCheckpointsRequest,
                        context: Any) -> pb.ListCheckpointsResponse:
        """A job's checkpoints (`checkpoints.list_checkpoints`)."""
        with _aborting(context):
            self._owned_job(context, "ListCheckpoints", request.job_id)
            records = checkpoints.list_checkpoints(request.job_id, self.state)
            return pb.ListCheckpointsResponse(
                checkpoints=[serde.checkpoint_to_proto(r) for r in records])

    def DownloadCheckpoint(self, request: pb.DownloadCheckpointRequest,
                           context: Any) -> Iterator[pb.DownloadCheckpointResponse]:
        """A checkpoint file: its description, then its chunks (`checkpoints.open_download`);
        or, asked for the data port when there is one, its description with a ticket for
        the bytes (`server.data_port`)."""
        with _aborting(context):
            self._owned_job(context, "DownloadCheckpoint", request.job_id)
            step = request.step if request.HasField("step") else None
            if request.data_port and self.data_port is not None:
                place = checkpoints.locate_download(request.job_id, step, request.file,
                                                    self.state, request.offset, request.length)
                ticket = self.data_port.download_ticket(place)
                yield pb.DownloadCheckpointResponse(info=pb.DownloadInfo(
                    step=place.step, file=serde.file_entry_to_proto(place.entry), end=place.end,
                    data=pb.DataTicket(port=self.data_port.port, ticket=ticket)))
                return
            step, entry, end, chunks = checkpoints.open_download(
                request.job_id, step, request.file, self.state, request.offset, request.length)
            with contextlib.closing(chunks):  # ends its blob lease, however the call ends
                yield pb.DownloadCheckpointResponse(info=pb.DownloadInfo(
                    step=step, file=serde.file_entry_to_proto(entry), end=end))
                yield from chunks  # bytes: encoded by `api.chunk_wire`

    def DeleteJob(self, request: pb.DeleteJobRequest, context: Any) -> pb.Job:
        """Delete a finished job and its files (`retention.delete_job`)."""
        with _aborting(context):
            self._owned_job(context, "DeleteJob", request.job_id)
            return self.jobs.message(retention.delete_job(request.job_id, self.state))

    def KeepCheckpoint(self, request: pb.KeepCheckpointRequest, context: Any) -> pb.Checkpoint:
        """Mark or unmark a checkpoint kept (`checkpoints.keep_checkpoint`)."""
        with _aborting(context):
            self._owned_job(context, "KeepCheckpoint", request.job_id)
            return serde.checkpoint_to_proto(checkpoints.keep_checkpoint(
                request.job_id, request.step, request.keep, self.state))

    def UploadCode(self, request_iterator: Iterator[pb.UploadCodeRequest],
                   context: Any) -> pb.CodeArchive:
        """Store a job's code archive (`code_store.receive_code`; any user: archives are
        content-addressed, so naming one in a job proves one had its bytes)."""
        with _aborting(context):
            sha256, size = serde.code_header_from_upload(next(request_iterator, None))
            sha256, size = code_store.receive_code(
                sha256, size, serde.code_chunks(request_iterator), self.state)
            return pb.CodeArchive(sha256=sha256, size=size)

    # -- users (admins only: the interceptor refuses everyone else)

    def CreateUser(self, request: pb.CreateUserRequest, context: Any) -> pb.UserToken:
        """Create a user and its first token (`users.create_user`)."""
        with _aborting(context):
            user, token = users.create_user(request.name, request.admin, self.state.store)
            log.info("user %s created%s", user.name, " (admin)" if user.admin else "")
            return pb.UserToken(user=serde.user_to_proto(user), token=token)

    def IssueToken(self, request: pb.IssueTokenRequest, context: Any) -> pb.UserToken:
        """Replace a user's token (`users.issue_token`)."""
        with _aborting(context):
            user, token = users.issue_token(request.name, self.state.store)
            log.info("user %s has a new token", user.name)
            return pb.UserToken(user=serde.user_to_proto(user), token=token)

    def RevokeUser(self, request: pb.RevokeUserRequest, context: Any) -> pb.User:
        """Revoke a user's token (`users.revoke_user`)."""
        with _aborting(context):
            user = users.revoke_user(request.name, self.state.store)
            log.info("user %s revoked", user.name)
            return serde.user_to_proto(user)

    def ListUsers(self, request: pb.ListUsersRequest, context: Any) -> pb.ListUsersResponse:
        """Every user (`users.list_users`)."""
        with _aborting(context):
            return pb.ListUsersResponse(
                users=[serde.user_to_proto(u) for u in users.list_users(self.state.store)])


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """``dptrain.v1.WorkerService``: each call acts only on the job its worker token names.

    Args:
        state: the server's state.
        auth: the server's authenticator (who is calling).
        data_port: the data port that upload and fetch tickets are issued for; None: none.
    """

    def __init__(self, state: ServiceState, auth: AuthInterceptor,
                 data_port: DataPort | None = None):
        self.state = state
        self.auth = auth
        self.data_port = data_port

    def _require_job(self, context: Any, method: str, job_id: str) -> None:
        principal = self.auth.principal(context.invocation_metadata(), WORKER_SERVICE + method)
        principal.require_job(job_id)

    def ReportProgress(self, request: pb.ReportProgressRequest,
                       context: Any) -> pb.ReportProgressResponse:
        """Store a worker's batch of events (`jobs.report_progress`)."""
        with _aborting(context):
            self._require_job(context, "ReportProgress", request.job_id)
            items = [serde.worker_event_from_proto(e) for e in request.events]
            last = jobs.report_progress(request.job_id, items, self.state)
            return pb.ReportProgressResponse(last_seq=last)

    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: Any) -> pb.HeartbeatResponse:
        """Record that the job's training made progress (`jobs.heartbeat`)."""
        with _aborting(context):
            self._require_job(context, "Heartbeat", request.job_id)
            state = jobs.heartbeat(request.job_id, self.state)
            return pb.HeartbeatResponse(state=serde.state_to_proto(state))

    def UploadCheckpoint(self, request_iterator: Iterator[pb.UploadCheckpointRequest],
                         context: Any) -> pb.Checkpoint:
        """Store an uploaded checkpoint (`checkpoints.receive_checkpoint`)."""
        with _aborting(context):
            first = next(request_iterator, None)  # a message, or an `api.chunk_wire.Chunk`
            item = None if first is None else "chunk" if isinstance(first, Chunk) else (
                first.WhichOneof("item"))
            if item != "header":
                raise ValidationError("header", "the first message must be the header", item)
            upload = serde.upload_header_from_proto(first.header)
            self._require_job(context, "UploadCheckpoint", upload.job_id)
            record = checkpoints.receive_checkpoint(
                upload, serde.chunks_from_upload(request_iterator), self.state)
            return serde.checkpoint_to_proto(record)

    def OpenCheckpointUpload(self, request: pb.CheckpointHeader,
                             context: Any) -> pb.DataTicket:
        """A ticket to upload a checkpoint over the data port, once its header passes every
        check UploadCheckpoint's would (`checkpoints.check_worker_upload`); port 0 when the
        server has no data port."""
        with _aborting(context):
            upload = serde.upload_header_from_proto(request)
            self._require_job(context, "OpenCheckpointUpload", upload.job_id)
            if self.data_port is None:
                return pb.DataTicket()
            checkpoints.check_worker_upload(upload, self.state)
            return pb.DataTicket(port=self.data_port.port,
                                 ticket=self.data_port.upload_ticket(upload))

    def FetchCheckpoint(self, request: pb.FetchCheckpointRequest,
                        context: Any) -> Iterator[pb.FetchCheckpointResponse]:
        """The newest intact checkpoint to resume from (`checkpoints.open_fetch`); or, asked
        for the data port when there is one, its header with a ticket for the files' bytes
        (`server.data_port`)."""
        with _aborting(context):
            self._require_job(context, "FetchCheckpoint", request.job_id)
            if request.data_port and self.data_port is not None:
                place = checkpoints.locate_fetch(request.job_id, self.state)
                ticket = self.data_port.fetch_ticket(place)
                yield pb.FetchCheckpointResponse(
                    header=serde.upload_header_to_proto(place.header),
                    data=pb.DataTicket(port=self.data_port.port, ticket=ticket))
                return
            header, chunks = checkpoints.open_fetch(request.job_id, self.state)
            with contextlib.closing(chunks):  # ends its blob lease, however the call ends
                yield pb.FetchCheckpointResponse(header=serde.upload_header_to_proto(header))
                for name, data in chunks:  # encoded by `api.chunk_wire`
                    yield Chunk(name, data)

    def FetchCode(self, request: pb.FetchCodeRequest,
                  context: Any) -> Iterator[pb.FetchCodeResponse]:
        """The job's code archive (`code_store.open_code`)."""
        with _aborting(context):
            self._require_job(context, "FetchCode", request.job_id)
            sha256, size, chunks = code_store.open_code(request.job_id, self.state)
            with contextlib.closing(chunks):  # ends its blob lease, however the call ends
                yield pb.FetchCodeResponse(info=pb.CodeArchive(sha256=sha256, size=size))
                for chunk in chunks:
                    yield pb.FetchCodeResponse(chunk=chunk)
