"""The coordinator's gRPC server: `serve` starts it, `CoordinatorServer` stops it.

What `serve` puts together: the SQLite store and the checkpoint blobs in the state directory,
the built-in admin's token (``STATE_DIR/token``), the two servicers behind the auth and metrics
interceptors, the standard health service (``grpc.health.v1.Health``, no token needed) and
server reflection (v1 and v1alpha), TLS when given a certificate, the data port where
checkpoint bytes travel beside gRPC (`server.data_port`), an optional Prometheus endpoint, and
the job runner its ``runner`` settings describe (without them, jobs simply
stay QUEUED).

It binds 127.0.0.1 by default and refuses any address beyond loopback without TLS unless
``insecure=True``: the bearer tokens would otherwise cross the network in the clear.

Example::

    server = serve(ServerSettings("state", port=50051, runner=RunnerSettings("state")))
    print(server.address, server.token)
    server.wait()          # until stop() is called, e.g. from a signal handler
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dptrain.coordinator.api import chunk_wire
from dptrain.coordinator.api.errors import CorruptRecord, JobNotFound, ValidationError
from dptrain.coordinator.api.limits import DEFAULT_MAX_CHECKPOINT_BYTES, channel_options
from dptrain.coordinator.server.auth import AuthInterceptor, load_or_create_token
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.code_listing import LISTING_DIR
from dptrain.coordinator.server.data_port import TICKET_LIFETIME_S, DataPort
from dptrain.coordinator.server.jobs import Runner, ServiceState
from dptrain.coordinator.server.metrics import Metrics, MetricsHTTPServer
from dptrain.coordinator.server.private_files import make_private_dir
from dptrain.coordinator.server.reflection import enable_reflection
from dptrain.coordinator.server.retention import Upkeep, collect_leftovers
from dptrain.coordinator.server.runner import JobRunner
from dptrain.coordinator.server.runner_settings import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.service import CoordinatorServicer, WorkerServicer
from dptrain.coordinator.server.store import SqliteStore, Store
from dptrain.coordinator.server.users import install_builtin_admin
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.code_archive import MAX_CODE_BYTES
from dptrain.worker.environment import ALLOWED_MODULES
from dptrain.worker.module_policy import check_prefix

__all__ = ["serve", "CoordinatorServer", "ServerSettings", "ServerConfigError", "Runner",
           "RunnerFactory", "RequestDecodingInterceptor", "UndecodableRequest", "SERVICE_NAMES",
           "DB_FILE", "BLOB_DIR", "DATA_PORT_AUTO", "is_loopback"]

log = logging.getLogger("dptrain.coordinator")

DATA_PORT_AUTO = -1
"""``ServerSettings.data_port``: the gRPC port + 1, or any free port when gRPC's is 0."""
DB_FILE = "coordinator.db"
BLOB_DIR = "blobs"
SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


class ServerConfigError(ValueError):
    """The server cannot start as configured (the message says what to change)."""


@dataclass(frozen=True)
class ServerSettings:
    """Everything `serve` needs to start a coordinator.

    Attributes:
        state_dir: its state directory (created if missing): ``coordinator.db``, ``blobs/``,
            ``token``, and the runner's ``jobs/``.
        host: the address to listen on; beyond loopback only with TLS or `insecure`.
        port: the port (0: any free one; see ``CoordinatorServer.port``).
        token: the built-in admin's token; default the one in ``state_dir/token`` (made once).
        tls_cert: PEM certificate (chain) to serve TLS with.
        tls_key: its PEM private key.
        tls_ca: the certificate workers verify the server with (default: `tls_cert`, right
            for a self-signed certificate).
        insecure: allow plaintext beyond loopback.
        data_roots: directories data files named in job specs must lie in.
        allowed_modules: prefixes of installed modules that jobs' ``package.module:function``
            references may name (``--allow-module``; none by default: a job names its shipped
            code or the zoo, ``worker.module_policy``). The workers get them too and check again.
        metrics_port: serve Prometheus metrics on this port (0: any free one; None: don't).
        data_port: the data port, where checkpoint bytes travel beside gRPC
            (`server.data_port`): `DATA_PORT_AUTO` (default) the gRPC port + 1, or any free
            one when `port` is 0; 0: any free one; None: no data port (transfers use the
            gRPC streams).
        data_ticket_s: seconds a data port ticket stays good when unused.
        cluster: the slots to schedule (default: this machine, a slot per core).
        max_workers: threads serving calls; every open watch or transfer holds one.
        max_checkpoint_bytes: the largest checkpoint file accepted.
        max_code_bytes: the largest code archive accepted (packed or unpacked), 50 MiB.
        default_max_restarts: ``max_restarts`` of jobs submitted without one (None: 3).
        advertise_address: ``host:port`` workers should use (default: from `host`).
        runner: the job runner's settings (its launcher among them); None: no runner, jobs
            stay QUEUED. The server runs it on its own state directory and gives the workers
            its own CA certificate, whatever ``runner.state_dir`` and ``runner.tls_ca`` say.
        retain_finished_s: delete finished jobs this many seconds after they finished, at
            start and hourly (`server.retention`); None (default): keep them.
    """

    state_dir: str | os.PathLike
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = field(default=None, repr=False)  # a secret: never in a log line
    tls_cert: str | os.PathLike | None = None
    tls_key: str | os.PathLike | None = None
    tls_ca: str | os.PathLike | None = None
    insecure: bool = False
    data_roots: Sequence[str | os.PathLike] = ()
    allowed_modules: Sequence[str] = ()
    metrics_port: int | None = None
    data_port: int | None = DATA_PORT_AUTO
    data_ticket_s: float = TICKET_LIFETIME_S
    cluster: Cluster | None = None
    max_workers: int = 256
    max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
    max_code_bytes: int = MAX_CODE_BYTES
    default_max_restarts: int | None = 3
    advertise_address: str | None = None
    runner: RunnerSettings | None = None
    retain_finished_s: float | None = None


#: ``runner_factory(store, blobs, cluster, worker_address, runner_settings) -> Runner``: a
#: runner other than the `JobRunner` (e.g. a test's stand-in).
RunnerFactory = Callable[[Store, BlobStore, Cluster, str, RunnerSettings], Runner]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1).

    Args:
        host: a host name or IP address.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}


def _reshaped(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable],
              request_deserializer: Callable | None) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s streaming shape that runs ``wrap(its behaviour)``."""
    behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                or handler.stream_stream)
    make = _HANDLERS[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(behavior), request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every call (a stream until its last message) and counts it by status code.

    Args:
        metrics: where the observations go.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        """The method's handler, wrapped to time it and count its status code.

        Args:
            continuation: gives the next handler.
            handler_call_details: the method's name and the call's metadata.

        Returns:
            The wrapped handler.
        """
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method, observe = handler_call_details.method, self.metrics.observe_rpc

        def code_of(context: Any, failed: bool) -> str:
            code = context.code()
            return code.name if code is not None else ("UNKNOWN" if failed else "OK")

        def unary(behavior: Callable) -> Callable:
            def timed(request: Any, context: Any) -> Any:
                start, failed = time.perf_counter(), False
                try:
                    return behavior(request, context)
                except BaseException:
                    failed = True
                    raise
                finally:
                    observe(method, code_of(context, failed), time.perf_counter() - start)
            return timed

        def streaming(behavior: Callable) -> Callable:
            def timed(request: Any, context: Any) -> Iterator[Any]:
                start, code = time.perf_counter(), None
                try:
                    yield from behavior(request, context)
                except GeneratorExit:
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = code_of(context, True)
                    raise
                finally:
                    observe(method, code or code_of(context, False), time.perf_counter() - start)
            return timed

        return _reshaped(handler, streaming if handler.response_streaming else unary,
                         handler.request_deserializer)


class UndecodableRequest(ValidationError):
    """Request bytes that are not the message the method takes (INVALID_ARGUMENT).

    Args:
        method: the full method name.
        error: what the decoder said.
        size: the number of bytes received.
    """

    def __init__(self, method: str, error: BaseException, size: int):
        super().__init__("request", f"must be the serialized request message of {method} "
                         f"({type(error).__name__}: {error})", f"{size} bytes")


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Answers INVALID_ARGUMENT, naming ``request``, to bytes that do not decode.

    gRPC Python answers INTERNAL "Exception deserializing request!" when a method's decoder
    raises, and a server fault it is not. So the decoder is wrapped to hand the error on instead
    of raising it, and the method refuses it: a unary method before it runs; a streaming one
    when it reaches the message (its servicer maps the `UndecodableRequest` it raises).
    """

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        """The method's handler with a decoder that never raises.

        Args:
            continuation: gives the next handler.
            handler_call_details: the method's name and the call's metadata.

        Returns:
            The wrapped handler.
        """
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, decode = handler_call_details.method, handler.request_deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as e:  # DecodeError, invalid UTF-8 in a string field, ...
                return UndecodableRequest(method, e, len(data))

        def refuse(context: Any, error: UndecodableRequest) -> None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))  # raises

        def checked(requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                if isinstance(request, UndecodableRequest):
                    raise request
                yield request

        def unary(behavior: Callable) -> Callable:
            def call(request: Any, context: Any) -> Any:
                if isinstance(request, UndecodableRequest):
                    refuse(context, request)
                return behavior(request, context)
            return call

        def stream_unary(behavior: Callable) -> Callable:
            def call(requests: Iterator[Any], context: Any) -> Any:
                try:
                    return behavior(checked(requests), context)
                except UndecodableRequest as e:  # a servicer that does not map it itself
                    refuse(context, e)
            return call

        def stream_stream(behavior: Callable) -> Callable:
            def call(requests: Iterator[Any], context: Any) -> Iterator[Any]:
                try:
                    yield from behavior(checked(requests), context)
                except UndecodableRequest as e:
                    refuse(context, e)
            return call

        if not handler.request_streaming:
            return _reshaped(handler, unary, tolerant)
        return _reshaped(handler, stream_stream if handler.response_streaming else stream_unary,
                         tolerant)


class ChunkWireInterceptor(grpc.ServerInterceptor):
    """Gives the checkpoint transfer methods the codecs of `api.chunk_wire`, which (de)serialize
    their chunks without copying the bytes (the generated handlers would use protobuf's)."""

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        """The method's handler, with chunk_wire's codecs for the transfer methods."""
        return chunk_wire.server_codecs(handler_call_details.method,
                                        continuation(handler_call_details))


class CoordinatorServer:
    """A running coordinator; build it with `serve`.

    Attributes:
        address: ``host:port`` it listens on (for clients on this machine).
        port: the port.
        token: the built-in admin's token.
        settings: how it was started, as it turned out: the state directory made, the port
            bound, ``tls_ca`` the certificate workers verify it with (None without TLS).
        worker_address: ``host:port`` as workers reach it (``DPTRAIN_COORDINATOR``).
        store: its job store.
        blobs: its checkpoint blobs.
        cluster: the slots it schedules.
        runner: the job runner, or None.
        metrics_port: the Prometheus endpoint's port, or None.
        data_port: the data port's port, or None (``settings.data_port`` says the same).
    """

    def __init__(self, *, grpc_server: grpc.Server, executor: futures.Executor,
                 state: ServiceState, token: str, settings: ServerSettings, address: str,
                 worker_address: str, health_servicer: Any, metrics_http: MetricsHTTPServer | None,
                 data_port: DataPort | None = None):
        self._server = grpc_server
        self._data_port = data_port
        self._executor = executor
        self._state = state
        self._health = health_servicer
        self._metrics_http = metrics_http
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.token = token
        self.settings = settings
        self.address = address
        self.worker_address = worker_address
        self.port = settings.port
        self.store, self.blobs, self.cluster = state.store, state.blobs, state.cluster
        self.runner: Runner | None = None
        self.upkeep: Upkeep | None = None
        self.metrics = state.metrics
        self.metrics_port = None if metrics_http is None else metrics_http.port
        self.data_port = None if data_port is None else data_port.port

    def stop(self, grace: float | None = 5.0) -> None:
        """Shut down: health NOT_SERVING and open watches end; then the runner stops, while
        gRPC still serves, so that preempted workers can upload their last checkpoint; then
        in-flight calls get `grace` seconds and the store closes. Idempotent.

        Args:
            grace: seconds in-flight calls may take to finish (None: cancel them now).
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._state.stopping.set()
            self._health.enter_graceful_shutdown()
            if self.runner is not None:
                try:
                    self.runner.stop()
                except Exception:
                    log.exception("the runner failed to stop cleanly")
            self._server.stop(grace).wait()
            if self._data_port is not None:  # its transfers end before the store closes
                self._data_port.stop()
            self._executor.shutdown(wait=False)
            if self.upkeep is not None:
                self.upkeep.stop()
            if self._metrics_http is not None:
                self._metrics_http.stop()
            self.store.close()
            self._stopped.set()
        log.info("coordinator at %s stopped", self.address)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `stop` has finished (or `timeout` seconds passed).

        Returns:
            True when the server has stopped.
        """
        return self._stopped.wait(timeout)

    def __enter__(self) -> CoordinatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tls_credentials(tls_cert: str | os.PathLike | None,
                     tls_key: str | os.PathLike | None) -> grpc.ServerCredentials | None:
    if tls_cert is None and tls_key is None:
        return None
    if tls_cert is None or tls_key is None:
        raise ServerConfigError("TLS needs both a certificate and its private key "
                                "(--tls-cert and --tls-key)")
    try:
        cert, key = Path(tls_cert).read_bytes(), Path(tls_key).read_bytes()
    except OSError as e:
        raise ServerConfigError(f"cannot read the TLS files: {e}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def _data_port_tls(tls_cert: str | os.PathLike, tls_key: str | os.PathLike) -> ssl.SSLContext:
    """The data port's TLS: the gRPC server's certificate and key, so that a client verifies
    both with the one CA certificate it has."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls_cert, tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ServerConfigError(f"cannot load the TLS files for the data port: {e}") from None
    return context


def _start_data_port(settings: ServerSettings, state: ServiceState,
                     tls: bool) -> DataPort | None:
    """The data port `settings` ask for (`ServerSettings.data_port`), on gRPC's host."""
    port = settings.data_port
    if port is None:
        return None
    if port == DATA_PORT_AUTO:
        port = settings.port + 1 if settings.port else 0
    if not 0 <= port <= 65535:
        raise ServerConfigError(f"data_port: must be a port number 0..65535 (by default the "
                                f"gRPC port + 1), or off, got {port}")
    context = _data_port_tls(settings.tls_cert, settings.tls_key) if tls else None
    try:
        return DataPort(state, settings.host, port, tls=context,
                        ticket_lifetime=settings.data_ticket_s)
    except OSError as e:
        raise ServerConfigError(f"cannot listen on {_host_port(settings.host, port)} for the "
                                f"data port (--data-port N|off): {e}") from None


def _worker_address(host: str, port: int, advertise: str | None) -> str:
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::", ""):
        return _host_port(socket.getfqdn(), port)
    return _host_port(host, port)


def serve(settings: ServerSettings, *,
          runner_factory: RunnerFactory | None = None) -> CoordinatorServer:
    """Start a coordinator.

    Args:
        settings: what to serve, where, and the runner's settings (see `ServerSettings`).
        runner_factory: builds the runner instead of the `JobRunner` (given the runner
            settings, or ``RunnerSettings(state_dir)`` when there are none).

    Returns:
        The running server.

    Raises:
        ServerConfigError: an unsafe or impossible configuration, or the port is taken.
    """
    host, tls_cert = settings.host, settings.tls_cert
    credentials = _tls_credentials(tls_cert, settings.tls_key)
    if credentials is None and not settings.insecure and not is_loopback(host):
        raise ServerConfigError(
            f"refusing to listen on {host} without TLS: tokens would cross the network in the "
            f"clear; give a certificate and key (--tls-cert/--tls-key), or --insecure to accept "
            f"that")
    default_max_restarts = (3 if settings.default_max_restarts is None
                            else settings.default_max_restarts)
    try:
        allowed_modules = tuple(check_prefix(p) for p in settings.allowed_modules)
    except ValueError as e:
        raise ServerConfigError(str(e)) from None
    state_dir = make_private_dir(settings.state_dir)  # specs, logs, checkpoints: 0700, not 0755
    admin_token = settings.token or load_or_create_token(state_dir)
    store = SqliteStore(state_dir / DB_FILE)
    executor: futures.ThreadPoolExecutor | None = None
    server: grpc.Server | None = None
    data_port: DataPort | None = None
    try:
        state = ServiceState(
            store=store, blobs=BlobStore(state_dir / BLOB_DIR,
                                         max_size=settings.max_checkpoint_bytes),
            cluster=settings.cluster if settings.cluster is not None else Cluster.local(),
            data_roots=tuple(Path(r).resolve() for r in settings.data_roots),
            default_max_restarts=default_max_restarts, max_code_bytes=settings.max_code_bytes,
            jobs_dir=RunnerSettings(state_dir).jobs_dir,
            code_listings=make_private_dir(state_dir / LISTING_DIR),
            allowed_modules=allowed_modules)
        if settings.retain_finished_s is not None and not settings.retain_finished_s > 0:
            raise ServerConfigError(f"retain_finished_s: must be > 0 seconds, got "
                                    f"{settings.retain_finished_s!r}")
        # Before any upload can be in flight: drop blobs no record refers to (the leftovers of
        # an upload or a deletion cut short by a crash), stray temporary files and the
        # directories of deleted jobs.
        collect_leftovers(state, min_age=0)

        def job_token_hash(job_id: str) -> str | None:
            try:
                return store.get_job(job_id).token_hash
            except (JobNotFound, CorruptRecord, ValueError):
                return None

        install_builtin_admin(store, admin_token)
        auth = AuthInterceptor(store.user_by_token_hash, job_token_hash)
        executor = futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                              thread_name_prefix="dptrain-rpc")
        # No SO_REUSEPORT: a second coordinator on a taken port fails instead of sharing it.
        # In this order: the auth interceptor refuses a caller before its request is decoded.
        server = grpc.server(executor, interceptors=[MetricsInterceptor(state.metrics), auth,
                                                     RequestDecodingInterceptor(),
                                                     ChunkWireInterceptor()],
                             options=[*channel_options(), ("grpc.so_reuseport", 0)])
        # Before gRPC binds: a gRPC server that never started keeps its port until collected.
        data_port = _start_data_port(settings, state, credentials is not None)
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(state, auth, data_port),
                                                  server)
        pb_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(state, auth, data_port),
                                                    server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", *SERVICE_NAMES):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        enable_reflection((*SERVICE_NAMES,
                           health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
        bind = _host_port(host, settings.port)
        try:
            bound = (server.add_secure_port(bind, credentials) if credentials is not None
                     else server.add_insecure_port(bind))
        except RuntimeError as e:
            raise ServerConfigError(f"cannot listen on {bind}: {e}") from None
        if not bound:
            raise ServerConfigError(f"cannot listen on {bind} (is the port taken?)")
        ca = settings.tls_ca if settings.tls_ca is not None else tls_cert
        settings = replace(settings, state_dir=state_dir, port=bound,
                           tls_ca=None if credentials is None else Path(ca).resolve(),
                           data_roots=state.data_roots,
                           default_max_restarts=default_max_restarts,
                           data_port=None if data_port is None else data_port.port)
        worker_address = _worker_address(host, bound, settings.advertise_address)
        metrics_http = None
        if settings.metrics_port is not None:
            metrics_http = MetricsHTTPServer(host, settings.metrics_port,
                                             lambda: state.metrics.render(store))
    except BaseException:
        if data_port is not None:
            data_port.stop()
        if server is not None:
            server.stop(None)
        if executor is not None:
            executor.shutdown(wait=False)
        store.close()
        raise
    coordinator = CoordinatorServer(grpc_server=server, executor=executor, state=state,
                                    token=admin_token, settings=settings,
                                    address=_host_port(host, bound),
                                    worker_address=worker_address,
                                    health_servicer=health_servicer, metrics_http=metrics_http,
                                    data_port=data_port)
    server.start()
    coordinator.upkeep = Upkeep(state, settings.retain_finished_s)
    coordinator.upkeep.start()
    if settings.runner is not None or runner_factory is not None:
        # The runner works in the server's state directory and its workers verify the
        # server's certificate: set here, once, so the two can never disagree.
        # The workers check the allowed prefixes again before they import (so does a job
        # stored under a longer list, at its next launch): this launch's list, from here.
        base = settings.runner or RunnerSettings(state_dir)
        runner_settings = replace(base, state_dir=state_dir, tls_ca=settings.tls_ca,
                                  extra_env={**base.extra_env,
                                             ALLOWED_MODULES: ",".join(allowed_modules)})
        try:
            coordinator.runner = state.runner = (runner_factory or JobRunner)(
                store, state.blobs, state.cluster, worker_address, runner_settings)
            coordinator.runner.start()
        except BaseException:
            coordinator.stop(grace=None)
            raise
    log.info("coordinator listening on %s (%s), data port %s", coordinator.address,
             "TLS" if credentials is not None else "plaintext",
             "off" if data_port is None else data_port.port)
    return coordinator
