"""Clients against a coordinator that predates the data port fall back to the gRPC streams:
once, with one line, and the bytes arrive as they would have.

The old server is a REAL ``grpc.server`` on loopback with today's servicers over a real SQLite
store and blob directory, registered through a generic handler that has the surface such a
server had: no ``OpenCheckpointUpload`` method (a call to it is UNIMPLEMENTED, as from any
server without the RPC), and the ``data_port`` fields of DownloadCheckpoint's and
FetchCheckpoint's requests dropped as they are parsed (an old server's generated code keeps
field numbers it does not know as unknown fields, and nothing reads them); there is no data
port behind it. So every answer is the old one: chunks."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from jobkit import TINY_SPEC, linear_checkpoint

from dptrain.coordinator.api.chunk_wire import server_codecs
from dptrain.coordinator.api.records import JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.client.worker_client import WorkerClient
from dptrain.coordinator.server.auth import AuthInterceptor
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.jobs import ServiceState
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.service import CoordinatorServicer, WorkerServicer
from dptrain.coordinator.server.store import SqliteStore
from dptrain.coordinator.server.users import install_builtin_admin
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.worker.checkpoint import MODEL_FILE
from dptrain.worker.checkpoint_manifest import MANIFEST

pytestmark = pytest.mark.timeout(300)

_NEWER = {"OpenCheckpointUpload"}  # the methods an old server does not have


def _old_parser(message_type):
    def parse(raw: bytes):
        request = message_type.FromString(raw)
        if "data_port" in message_type.DESCRIPTOR.fields_by_name:
            request.ClearField("data_port")
        return request
    return parse


def _old_handler(service: str, servicer) -> grpc.GenericRpcHandler:
    """`service`'s methods that an old server had, each bound to `servicer`'s."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name[service].methods:
        if method.name in _NEWER:
            continue
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            method.client_streaming, method.server_streaming]
        handler = kind(getattr(servicer, method.name),
                       request_deserializer=_old_parser(getattr(pb, method.input_type.name)),
                       response_serializer=getattr(pb, method.output_type.name
                                                   ).SerializeToString)
        # The chunks the servicer yields, encoded as today's server encodes them.
        handlers[method.name] = server_codecs(f"/dptrain.v1.{service}/{method.name}", handler)
    return grpc.method_handlers_generic_handler(f"dptrain.v1.{service}", handlers)


@pytest.fixture
def old_server(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    state = ServiceState(store=store, blobs=BlobStore(tmp_path / "blobs"),
                         cluster=Cluster.local(1))
    admin = new_token()
    install_builtin_admin(store, admin)

    def job_token_hash(job_id: str) -> str | None:
        return store.get_job(job_id).token_hash

    auth = AuthInterceptor(store.user_by_token_hash, job_token_hash)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[auth])
    server.add_generic_rpc_handlers([
        _old_handler("Coordinator", CoordinatorServicer(state, auth)),
        _old_handler("WorkerService", WorkerServicer(state, auth))])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", admin, store
    server.stop(None)
    store.close()


def test_uploads_downloads_and_fetches_fall_back_to_the_streams_once(old_server, tmp_path,
                                                                     caplog):
    address, admin, store = old_server
    with Client(address, token=admin) as c:
        job_id = c.submit_job({**TINY_SPEC, "workers": 1}).id
    token = new_token()
    store.transition(job_id, JobState.QUEUED, JobState.RUNNING, token_hash=hash_token(token),
                     placement={"localhost": 1})
    first = linear_checkpoint(tmp_path / "one", 1, 300)
    second = linear_checkpoint(tmp_path / "two", 2, 300)
    notice = f"coordinator {address}: {{}}; checkpoint transfers use the gRPC streams"
    with caplog.at_level(logging.WARNING, logger="dptrain.client"):
        with WorkerClient(address, job_id, token) as worker:
            assert worker.upload_checkpoint(first).step == 1
            assert worker.upload_checkpoint(second).step == 2
            assert not worker.data_port
        with WorkerClient(address, job_id, token) as restarted:  # a rank resuming: asks anew
            fetched = Path(restarted.fetch_checkpoint(tmp_path / "fetched"))
            assert not restarted.data_port
        with Client(address, token=admin) as user:
            for file in (MODEL_FILE, MANIFEST):
                user.download_checkpoint(job_id, step=1, file=file, dest=tmp_path / file)
            assert not user.data_port
    assert [r.getMessage() for r in caplog.records] == [
        notice.format("it does not take uploads over a data port (UNIMPLEMENTED)"),
        notice.format("it has no data port"), notice.format("it has no data port")]
    assert [r.step for r in store.list_checkpoints(job_id)] == [1, 2]
    assert fetched.name == "step-00000002"
    for name in (MODEL_FILE, "optimizer.safetensors", MANIFEST):
        assert (fetched / name).read_bytes() == (second / name).read_bytes()
    for name in (MODEL_FILE, MANIFEST):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes()
