"""The data port's metrics (``server.metrics``: ``dptrain_data_connections_total{outcome}``
and ``dptrain_data_bytes_total{direction}``) against values counted by hand after real
transfers: a REAL coordinator on loopback read through its Prometheus endpoint over HTTP, and
a data port bound to one connection at a time."""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest
from data_port_kit import TOKENS, present, running_job
from jobkit import linear_checkpoint

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.checkpoint_upload import read_checkpoint_directory
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.data_wire import read_status
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.data_port import DataPort
from dptrain.coordinator.server.jobs import ServiceState
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.store import MemoryStore
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.checkpoint import MODEL_FILE
from dptrain.worker.checkpoint_manifest import MANIFEST

pytestmark = pytest.mark.timeout(300)

_DATA_LINE = re.compile(r'^dptrain_data_(connections|bytes)_total\{\w+="(\w+)"\} (\d+)$', re.M)


def _data_metrics(page: str) -> dict[str, int]:
    """``{"connections.served": n, ..., "bytes.sent": n, ...}`` from a metrics page."""
    return {f"{kind}.{label}": int(n) for kind, label, n in _DATA_LINE.findall(page)}


def _after(read_page, connections: int) -> dict[str, int]:
    """The data port's counters once `connections` connections have ended: the server counts
    one as it closes it, which may come after its peer has every byte it waited for."""
    while True:
        counted = _data_metrics(read_page())
        if sum(n for k, n in counted.items() if k.startswith("connections.")) >= connections:
            return counted


def _counts(served=0, refused=0, busy=0, broken=0, sent=0, received=0) -> dict[str, int]:
    return {"connections.served": served, "connections.refused": refused,
            "connections.busy": busy, "connections.broken": broken,
            "bytes.sent": sent, "bytes.received": received}


def test_connections_by_outcome_and_bytes_by_direction_are_counted(serve_coordinator,
                                                                   tmp_path):
    server = serve_coordinator(metrics_port=0, data_ticket_s=3600.0)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"

    def page() -> str:
        with urllib.request.urlopen(url) as answer:
            return answer.read().decode()

    assert _data_metrics(page()) == _counts()
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    size = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    data_files = size[MODEL_FILE] + size["optimizer.safetensors"]  # the manifest: in gRPC

    worker.upload_checkpoint(ckpt)
    assert _after(page, 1) == _counts(served=1, received=data_files)
    with Client(server.address, token=server.token) as client:
        client.download_checkpoint(job_id, dest=tmp_path / "model")
    worker.fetch_checkpoint(tmp_path / "fetched")
    assert _after(page, 3) == _counts(served=3, sent=size[MODEL_FILE] + data_files,
                                      received=data_files)

    # A ticket by hand: served once (the manifest's bytes), refused when used again; and one
    # never issued.
    stub = pb_grpc.CoordinatorStub(worker.channel)
    first = next(stub.DownloadCheckpoint(
        pb.DownloadCheckpointRequest(job_id=job_id, file=MANIFEST, data_port=True),
        metadata=bearer_metadata(server.token)))
    sock, status = present(server.data_port, first.info.data.ticket)
    with sock:
        assert status[0] == "OK"
        while sock.recv(1 << 16):
            pass
    for ticket in (first.info.data.ticket, bytes(32)):
        sock, status = present(server.data_port, ticket)
        sock.close()
        assert status[0] == "ABORTED"

    # Broken: half a ticket, then gone; an upload that stops after 1000 of its bytes.
    with socket.create_connection(("127.0.0.1", server.data_port)) as half:
        half.sendall(b"half a ticket")
    two = linear_checkpoint(tmp_path / "two", 2, 300)
    header, _ = read_checkpoint_directory(job_id, two)
    ticket = pb_grpc.WorkerServiceStub(worker.channel).OpenCheckpointUpload(
        serde.upload_header_to_proto(header), metadata=bearer_metadata(TOKENS[job_id], job_id))
    sock, status = present(ticket.port, ticket.ticket)
    with sock:
        assert status[0] == "OK"
        sock.sendall((two / MODEL_FILE).read_bytes()[:1000])
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the server closed it: nothing stored, nobody to answer
    assert _after(page, 8) == _counts(
        served=4, refused=2, broken=2, sent=size[MODEL_FILE] + data_files + size[MANIFEST],
        received=data_files + 1000)
    assert server.store.list_checkpoints(job_id)[-1].step == 1


def test_connections_beyond_the_bound_are_turned_away_counted_and_the_rest_go_on(tmp_path):
    state = ServiceState(store=MemoryStore(), blobs=BlobStore(tmp_path / "blobs"),
                         cluster=Cluster.local(1))
    port = DataPort(state, "127.0.0.1", 0, max_connections=1)
    try:
        first = socket.create_connection(("127.0.0.1", port.port))
        first.sendall(b"x")  # holds the one slot while it waits for the rest of a ticket
        with socket.create_connection(("127.0.0.1", port.port)) as second:
            assert read_status(second) == (
                "UNAVAILABLE", "the data port serves too many transfers: try again", b"")
        first.close()
        # Its slot comes back once the server has closed the first connection.
        turned_away = 1
        while True:
            with socket.create_connection(("127.0.0.1", port.port)) as third:
                third.sendall(bytes(32))
                code = read_status(third)[0]
            if code == "ABORTED":  # served: an unknown ticket
                break
            assert code == "UNAVAILABLE"
            turned_away += 1
        assert _after(state.metrics.render, 2 + turned_away) == _counts(
            refused=1, busy=turned_away, broken=1)
    finally:
        port.stop()
        state.store.close()
