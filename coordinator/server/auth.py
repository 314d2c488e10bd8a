"""Tokens on the server's side: the built-in admin's token file, and the interceptor that
applies `server.access` (who may call what) to every call before the servicer runs.

The built-in admin's token is generated on the first start into ``STATE_DIR/token`` (mode
0600, no trailing newline: gRPC clients in other languages send a file's bytes as they are,
and grpc-js refuses a header ending in a newline). The CLI on the server's machine reads it
from there; every other user gets a token of its own (``dptrain user add``). The token's
client side (files, environment, metadata) is `api.credentials`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from dptrain.coordinator.api.credentials import TOKEN_FILE, read_token_file, write_token_file
from dptrain.coordinator.api.errors import CoordinatorError, status_name
from dptrain.coordinator.api.records import User
from dptrain.coordinator.server.access import Principal, authenticate
from dptrain.coordinator.server.private_files import make_private_dir

__all__ = ["WORKER_SERVICE", "load_or_create_token", "AuthInterceptor"]

WORKER_SERVICE = "/dptrain.v1.WorkerService/"


# ---------------------------------------------------------------- tokens on disk

def load_or_create_token(state_dir: str | os.PathLike) -> str:
    """The built-in admin's token in ``state_dir/token``, generated (256 bits) if absent.

    A file written by an older version, with a trailing newline, keeps working: readers strip
    whitespace.

    Args:
        state_dir: the server's state directory (created if missing).

    Returns:
        The token.
    """
    path = Path(state_dir) / TOKEN_FILE
    make_private_dir(path.parent)
    if not path.exists():
        write_token_file(path, secrets.token_urlsafe(32))
    return read_token_file(path)


# ---------------------------------------------------------------- checking

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
    """Refuses every call that `access.authenticate` refuses, before any servicer code runs
    (an unauthenticated caller's request bytes are never even decoded).

    The servicers ask it who is calling (`principal`) to apply the rules that need the job.

    Args:
        user_of: token hash -> the user holding that token now, or None (the store).
        job_token_hash: job id -> its stored worker token hash, or None.
    """

    def __init__(self, user_of: Callable[[str], User | None],
                 job_token_hash: Callable[[str], str | None]):
        self.user_of = user_of
        self.job_token_hash = job_token_hash

    def principal(self, metadata: Iterable[tuple[str, Any]], method: str) -> Principal:
        """`access.authenticate` with this server's users and jobs."""
        return authenticate(metadata, method, self.user_of, self.job_token_hash)

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
        except CoordinatorError as e:  # refused; or the store closed (UNAVAILABLE)
            return _reject(handler, getattr(grpc.StatusCode, status_name(e)), str(e))
        return handler
