"""Who may call what: the coordinator's bearer token, per-job worker tokens, and the interceptor.

* The **coordinator token** is generated on the first start into ``STATE_DIR/token`` (mode
  0600) and read from there by the CLI; a client can also be given it directly, by file, or in
  the environment (``DPTRAIN_TOKEN`` / ``DPTRAIN_TOKEN_FILE``). It may call every RPC.
* A **worker token** is made for each launch of a job; the store keeps only its hash. A worker
  sends it together with ``dptrain-job-id: <job id>``; it may call ``dptrain.v1.WorkerService``
  for that job and nothing else. It dies with its attempt: the next launch replaces it (the
  old one is then UNAUTHENTICATED), and once the job is over (SUCCEEDED, FAILED, CANCELLED)
  every worker call is refused with FAILED_PRECONDITION (`server.jobs` and
  `server.checkpoint_store` check the job's state where they write). The token's client side
  (files, environment, metadata) is `api.credentials`.
* Every RPC but the standard health service needs one of them: without a valid token the
  answer is UNAUTHENTICATED; a worker token outside its scope gets PERMISSION_DENIED.

Tokens are compared in constant time. `authenticate` is plain Python (tested without a
server); `AuthInterceptor` applies it to every call before the servicer runs.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dptrain.coordinator.api.credentials import (
    AUTHORIZATION,
    JOB_ID_HEADER,
    TOKEN_FILE,
    read_token_file,
)
from dptrain.coordinator.api.errors import CoordinatorError
from dptrain.coordinator.api.records import verify_token
from dptrain.coordinator.server.private_files import make_private_dir

__all__ = [
    "WORKER_SERVICE", "HEALTH_SERVICE", "Unauthenticated", "PermissionDenied", "Principal",
    "require_job_owner",
    "load_or_create_token", "authenticate", "AuthInterceptor",
]

WORKER_SERVICE = "/dptrain.v1.WorkerService/"
HEALTH_SERVICE = "/grpc.health.v1.Health/"


class Unauthenticated(CoordinatorError):
    """No token, or one that is not valid (UNAUTHENTICATED)."""

    status = "UNAUTHENTICATED"


class PermissionDenied(CoordinatorError):
    """A valid worker token used outside its job or service (PERMISSION_DENIED)."""

    status = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the coordinator's token holder (``admin``), or a job's workers.

    Attributes:
        admin: the caller presented the coordinator token.
        job_id: for a worker token, the job it belongs to; None for admins and health checks.
    """

    admin: bool
    job_id: str | None = None

    def require_job(self, job_id: str) -> None:
        """Allow acting on `job_id`: admins on any job, a worker on its own.

        Raises:
            PermissionDenied: a worker token of another job.
        """
        if not self.admin and self.job_id != job_id:
            raise PermissionDenied(f"this worker token belongs to job {self.job_id!r}, "
                                   f"not {job_id!r}")


def require_job_owner(principal: Principal, job_id: str) -> None:
    """Allow changing or deleting a job's stored results (DeleteJob, KeepCheckpoint) to its
    owner or an admin. Today every caller of the ``Coordinator`` service is an admin (worker
    tokens never get that far); the owner's row belongs here when jobs have owners.

    Raises:
        PermissionDenied: anyone else.
    """
    if not principal.admin:
        raise PermissionDenied(f"only the owner of job {job_id!r} or an admin may do this")


# ---------------------------------------------------------------- tokens on disk

def load_or_create_token(state_dir: str | os.PathLike) -> str:
    """The coordinator token in ``state_dir/token``, generated (256 bits, mode 0600) if absent.

    Args:
        state_dir: the server's state directory (created if missing).

    Returns:
        The token.
    """
    path = Path(state_dir) / TOKEN_FILE
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token_file(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


# ---------------------------------------------------------------- checking

def authenticate(metadata: Iterable[tuple[str, Any]], method: str, admin_token: str,
                 job_token_hash: Callable[[str], str | None]) -> Principal:
    """Decide who is calling `method`, or refuse.

    Args:
        metadata: the call's metadata pairs.
        method: the full method name, e.g. ``/dptrain.v1.Coordinator/GetJob``.
        admin_token: the coordinator token.
        job_token_hash: job id -> its stored worker token hash (None: no such job).

    Returns:
        The caller (health checks pass as a non-admin without a job).

    Raises:
        Unauthenticated: no token, or neither the coordinator's nor the named job's.
        PermissionDenied: a worker token on anything but ``WorkerService``.
    """
    if method.startswith(HEALTH_SERVICE):
        return Principal(admin=False)
    values = {}
    for key, value in metadata:
        values.setdefault(key.lower(), value)
    header = values.get(AUTHORIZATION, "")
    scheme, _, token = str(header).partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("missing bearer token: send the metadata 'authorization: "
                              "Bearer <token>' (the token is in the server's STATE_DIR/token)")
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(admin=True)
    job_id = str(values.get(JOB_ID_HEADER, ""))
    token_hash = job_token_hash(job_id) if job_id else None
    if not token_hash or not verify_token(token, token_hash):
        raise Unauthenticated(f"invalid token: neither the coordinator's token nor the current "
                              f"worker token of job {job_id!r} (named in 'dptrain-job-id'; "
                              f"every launch of a job replaces its workers' token)")
    if not method.startswith(WORKER_SERVICE):
        raise PermissionDenied(f"a worker token may call only dptrain.v1.WorkerService, not "
                               f"{method.lstrip('/')}")
    return Principal(admin=False, job_id=job_id)


def _reject(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
            message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call, without decoding the
    request: an unauthenticated caller's bytes are never parsed."""
    def refuse(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def refuse_stream(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)
        yield  # pragma: no cover - makes this a generator, as streaming handlers are

    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call that `authenticate` refuses, before any servicer code runs.

    The servicer checks the job a worker names against its token (`Principal.require_job`).

    Args:
        admin_token: the coordinator token.
        job_token_hash: job id -> its stored worker token hash, or None.
    """

    def __init__(self, admin_token: str, job_token_hash: Callable[[str], str | None]):
        self.admin_token = admin_token
        self.job_token_hash = job_token_hash

    def principal(self, metadata: Iterable[tuple[str, Any]], method: str) -> Principal:
        """`authenticate` with this server's tokens (the servicer's own check)."""
        return authenticate(metadata, method, self.admin_token, self.job_token_hash)

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        """The method's handler, or one that refuses the call (same streaming shape).

        Args:
            continuation: gives the next handler.
            handler_call_details: the method's name and the call's metadata.

        Returns:
            The handler to run.
        """
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        try:
            self.principal(handler_call_details.invocation_metadata or (),
                           handler_call_details.method)
        except (Unauthenticated, PermissionDenied) as e:
            return _reject(handler, getattr(grpc.StatusCode, e.status), str(e))
        return handler
