"""Checkpoint bytes over the coordinator's data port (``server.data_port``), against a REAL
coordinator on loopback with real sockets and files: uploads and downloads byte-identical to
the worker's files and to what the gRPC streams store and send, verified against the manifest
(BLAKE3 computed here, independently); damage on either side refused (DATA_LOSS, nothing
kept); tickets good once and only while fresh; garbage, silence and a job that ended between
ticket and bytes; the fall back to the streams when the port is off or unreachable; a broken
data connection resumed; ranges; TLS.

A TCP forwarder on 127.0.0.2 stands for the network between client and coordinator: it lets
gRPC through and, as a test asks, forwards the data port or not, or cuts a data connection
after some bytes (the server listens on 127.0.0.1 only, so 127.0.0.2's ports are the
forwarder's)."""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path

import blake3
import grpc
import pytest
from data_port_kit import SPEC, TOKENS, Forwarder, present, running_job
from jobkit import DPTRAIN, ServeProcess, free_port, linear_checkpoint, run_cli

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.checkpoint_upload import read_checkpoint_directory
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.data_wire import read_status
from dptrain.coordinator.api.records import JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.client.worker_client import WorkerClient
from dptrain.coordinator.server.blobs import blob_id
from dptrain.coordinator.server.checkpoint_store import record_blobs
from dptrain.coordinator.server.data_port import HANDSHAKE_TIMEOUT_S
from dptrain.coordinator.server.server import (
    DATA_PORT_AUTO,
    ServerConfigError,
    ServerSettings,
    serve,
)
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.checkpoint import MODEL_FILE
from dptrain.worker.checkpoint_manifest import MANIFEST

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- helpers

def _blake3(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def _stored_files(server, job_id: str, step: int) -> dict[str, bytes]:
    record = server.store.get_checkpoint(job_id, step)
    return {name: server.blobs.get(blob).read_bytes()
            for name, blob in record_blobs(record).items()}


def _raw_ticket(server, job_id: str, **request) -> pb.DownloadInfo:
    """DownloadCheckpoint asked for the data port, by hand: its description and ticket."""
    with Client(server.address, token=server.token) as c:
        stub = pb_grpc.CoordinatorStub(c.channel)
        call = stub.DownloadCheckpoint(pb.DownloadCheckpointRequest(
            job_id=job_id, data_port=True, **request), metadata=bearer_metadata(server.token))
        first = next(call)
        rest = len(list(call))  # chunks: none when the bytes come from the data port
    assert first.WhichOneof("item") == "info"
    assert rest == (0 if first.info.HasField("data") else -(-first.info.file.size // (1 << 20)))
    return first.info


def _receive_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a reset, when it left our bytes unread, too)."""
    parts = []
    try:
        while data := sock.recv(1 << 20):
            parts.append(data)
    except ConnectionResetError:
        pass
    return b"".join(parts)


@pytest.fixture
def server(serve_coordinator):
    return serve_coordinator()


# ---------------------------------------------------------------- the happy paths

def test_an_upload_and_downloads_over_the_data_port_are_the_worker_files(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 1200)  # 5.8 MB: several sendfile calls
    record = worker.upload_checkpoint(ckpt)
    assert worker.data_port  # no fall back happened
    metrics = server.metrics.render(server.store)
    assert 'method="/dptrain.v1.WorkerService/OpenCheckpointUpload",code="OK"} 1' in metrics
    assert "WorkerService/UploadCheckpoint" not in metrics
    stored = _stored_files(server, job_id, 1)
    assert stored == {name: (ckpt / name).read_bytes()
                      for name in ("model.safetensors", "optimizer.safetensors", MANIFEST)}
    assert record.manifest["files"][MODEL_FILE]["blake3"] == _blake3(ckpt / MODEL_FILE)
    assert record.size == sum(len(b) for b in stored.values())
    with Client(server.address, token=server.token) as client:
        for file in (MODEL_FILE, "optimizer.safetensors", MANIFEST):
            got = client.download_checkpoint(job_id, step=1, file=file, dest=tmp_path / file)
            assert (tmp_path / file).read_bytes() == (ckpt / file).read_bytes()
            assert got.size == (ckpt / file).stat().st_size
        assert client.data_port


def test_the_data_port_stores_and_sends_what_the_gRPC_streams_do(server, tmp_path):
    ckpt = linear_checkpoint(tmp_path / "ckpt", 3, 700)
    job_port, over_port = running_job(server)
    job_stream, over_stream = running_job(server, data_port=False)
    by_port, by_stream = over_port.upload_checkpoint(ckpt), over_stream.upload_checkpoint(ckpt)
    assert "WorkerService/UploadCheckpoint" in server.metrics.render(server.store)
    assert (by_port.step, by_port.sha256, by_port.size, by_port.manifest) == (
        by_stream.step, by_stream.sha256, by_stream.size, by_stream.manifest)
    assert _stored_files(server, job_port, 3) == _stored_files(server, job_stream, 3)
    with Client(server.address, token=server.token) as port, \
            Client(server.address, token=server.token, data_port=False) as stream:
        a = port.download_checkpoint(job_port, dest=tmp_path / "a")
        b = stream.download_checkpoint(job_port, dest=tmp_path / "b")
    assert (a.step, a.size, a.digest) == (b.step, b.size, b.digest)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == (
        ckpt / MODEL_FILE).read_bytes()


def test_ranges_over_two_streams_each_take_a_ticket(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 1500)  # 9 MB, over the first range's 4 MiB
    worker.upload_checkpoint(ckpt)
    grpc_forward, data_forward = Forwarder(server.port), Forwarder(server.data_port)
    try:
        with Client(f"127.0.0.2:{server.port}", token=server.token) as client:
            client.download_checkpoint(job_id, dest=tmp_path / "out", streams=2)
    finally:
        grpc_forward.close()
        data_forward.close()
    assert (tmp_path / "out").read_bytes() == (ckpt / MODEL_FILE).read_bytes()
    assert data_forward.connections >= 3  # the first range, then one per stream


def test_a_download_ticket_covers_exactly_the_bytes_asked_for(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    worker.upload_checkpoint(ckpt)
    reference = (ckpt / MODEL_FILE).read_bytes()
    info = _raw_ticket(server, job_id, offset=1000, length=5000)
    assert (info.end, info.data.port, len(info.data.ticket)) == (6000, server.data_port, 32)
    sock, status = present(info.data.port, info.data.ticket)
    with sock:
        assert status == ("OK", "", b"")
        assert _receive_all(sock) == reference[1000:6000]


# ---------------------------------------------------------------- the worker's resume fetch

def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_a_resume_fetch_over_the_data_port_is_what_the_stream_fetches(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 2, 900)  # 9.7 MB: several sendfile calls
    worker.upload_checkpoint(ckpt)
    with WorkerClient(server.address, job_id, TOKENS[job_id], data_port=False) as streams:
        by_port = Path(worker.fetch_checkpoint(tmp_path / "port"))
        by_stream = Path(streams.fetch_checkpoint(tmp_path / "stream"))
    assert worker.data_port  # it took the ticket, and no fall back happened
    assert by_port.name == by_stream.name == "step-00000002"
    assert _same_files(by_port, ckpt) and _same_files(by_stream, ckpt)


def test_a_resume_fetch_damaged_on_the_way_is_refused(server, tmp_path):
    job_id, worker = running_job(server)
    worker.upload_checkpoint(linear_checkpoint(tmp_path / "ckpt", 1, 300))
    grpc_forward = Forwarder(server.port)
    data_forward = Forwarder(server.data_port, flip_at=10_000)  # in model.safetensors
    try:
        with WorkerClient(f"127.0.0.2:{server.port}", job_id, TOKENS[job_id]) as far:
            with pytest.raises(ClientError, match=r"^DATA_LOSS: model\.safetensors: received "
                                                  r"\d+ bytes hashing to "):
                far.fetch_checkpoint(tmp_path / "dest")
            assert far.data_port
    finally:
        grpc_forward.close()
        data_forward.close()
    assert data_forward.connections == 1
    assert list((tmp_path / "dest").iterdir()) == []  # no checkpoint, no temporary directory


def test_a_tampered_stored_blob_is_never_fetched(server, tmp_path):
    job_id, worker = running_job(server)
    first = linear_checkpoint(tmp_path / "one", 1, 300)
    worker.upload_checkpoint(first)
    worker.upload_checkpoint(linear_checkpoint(tmp_path / "two", 2, 300))
    blob = server.blobs.get(record_blobs(server.store.get_checkpoint(job_id, 2))[MODEL_FILE])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o600)
    blob.write_bytes(bytes(data))
    fetched = Path(worker.fetch_checkpoint(tmp_path / "dest"))
    assert worker.data_port
    assert fetched.name == "step-00000001" and _same_files(fetched, first)


def test_a_resume_fetch_falls_back_to_the_stream_when_the_port_is_unreachable(
        server, tmp_path, caplog):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    worker.upload_checkpoint(ckpt)
    forward = Forwarder(server.port)  # gRPC gets through; the data port does not
    try:
        with WorkerClient(f"127.0.0.2:{server.port}", job_id, TOKENS[job_id]) as far, \
                caplog.at_level(logging.WARNING, logger="dptrain.client"):
            fetched = Path(far.fetch_checkpoint(tmp_path / "dest"))
            assert not far.data_port
    finally:
        forward.close()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"coordinator 127.0.0.2:{server.port}: its data port is unreachable"]
    assert _same_files(fetched, ckpt)


# ---------------------------------------------------------------- damage

def test_a_tampered_stored_file_fails_the_download_and_leaves_nothing(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    worker.upload_checkpoint(ckpt)
    blob = server.blobs.get(record_blobs(server.store.get_checkpoint(job_id, 1))[MODEL_FILE])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o600)
    blob.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with Client(server.address, token=server.token) as client:
        with pytest.raises(ClientError, match=r"^DATA_LOSS: model\.safetensors of step 1: "):
            client.download_checkpoint(job_id, step=1, dest=dest / "out")
        assert client.data_port
    assert list(dest.iterdir()) == []  # no file, no part


def test_an_upload_whose_bytes_changed_after_the_manifest_is_refused(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    model = ckpt / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01  # the right size, a wrong byte
    model.write_bytes(bytes(data))
    with pytest.raises(ClientError, match=r"^DATA_LOSS: .*blake3"):
        worker.upload_checkpoint(ckpt)
    assert worker.data_port
    assert server.store.list_checkpoints(job_id) == []
    assert not server.blobs.exists(blob_id("blake3", _blake3(model)))


def test_a_header_is_checked_before_any_byte_travels(server, tmp_path):
    job_id, worker = running_job(server)
    header, _ = read_checkpoint_directory(job_id, linear_checkpoint(tmp_path / "ckpt", 1, 30))
    bad = serde.upload_header_to_proto(header)
    bad.step = 2
    stub = pb_grpc.WorkerServiceStub(worker.channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.OpenCheckpointUpload(bad, metadata=bearer_metadata(TOKENS[job_id],
                                                                job_id))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "header.step: must equal the manifest's step (1), got 2"


# ---------------------------------------------------------------- tickets and hostile peers

def test_unknown_and_used_tickets_are_refused(serve_coordinator, tmp_path):
    server = serve_coordinator(data_ticket_s=3600.0)
    job_id, worker = running_job(server)
    worker.upload_checkpoint(linear_checkpoint(tmp_path / "ckpt", 1, 100))
    info = _raw_ticket(server, job_id)
    sock, status = present(server.data_port, info.data.ticket)
    sock.close()
    assert status[0] == "OK"
    for ticket in (info.data.ticket, bytes(32)):  # used; never issued
        sock, status = present(server.data_port, ticket)
        with sock:
            assert status == ("ABORTED", "unknown, used or expired data ticket: ask for a new "
                              "one through the gRPC call", b"")
            assert sock.recv(1) == b""  # closed


def test_an_expired_ticket_is_refused_and_nothing_is_stored(serve_coordinator, tmp_path):
    expiring = serve_coordinator(data_ticket_s=0.0)  # every ticket expires at once
    job_id, worker = running_job(expiring)
    with pytest.raises(ClientError, match="^ABORTED: the data port .* refused the transfer: "
                                          "unknown, used or expired data ticket"):
        worker.upload_checkpoint(linear_checkpoint(tmp_path / "ckpt2", 1, 100))
    assert expiring.store.list_checkpoints(job_id) == []
    assert worker.health() == "SERVING"


def test_garbage_and_silence_on_the_port_are_closed_and_the_server_serves_on(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 100)
    with socket.create_connection(("127.0.0.1", server.data_port)) as garbage:
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(32, b"\0"))
        code, message, _ = read_status(garbage)
        assert code == "ABORTED"
        assert _receive_all(garbage) == b""
    with socket.create_connection(("127.0.0.1", server.data_port)) as more:
        more.sendall(bytes(range(256)) * 64)
        assert _receive_all(more).startswith(b"ABORTED 0 unknown, used or expired")
    with socket.create_connection(("127.0.0.1", server.data_port)) as silent:
        silent.sendall(b"half a ticket")
        silent.settimeout(HANDSHAKE_TIMEOUT_S * 10)
        assert silent.recv(1) == b""  # closed by the server, not by this timeout
    assert worker.upload_checkpoint(ckpt).step == 1
    with Client(server.address, token=server.token) as client:
        client.download_checkpoint(job_id, dest=tmp_path / "out")
        assert client.data_port
    assert (tmp_path / "out").read_bytes() == (ckpt / MODEL_FILE).read_bytes()


def test_a_job_that_ended_between_ticket_and_bytes_stores_nothing(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 100)
    header, _ = read_checkpoint_directory(job_id, ckpt)
    stub = pb_grpc.WorkerServiceStub(worker.channel)
    ticket = stub.OpenCheckpointUpload(serde.upload_header_to_proto(header),
                                       metadata=bearer_metadata(TOKENS[job_id],
                                                                job_id))
    server.store.transition(job_id, JobState.RUNNING, JobState.FAILED)
    sock, status = present(ticket.port, ticket.ticket)
    with sock:
        assert status[0] == "OK"
        for f in header.files:
            sock.sendall((ckpt / f.name).read_bytes())
        code, message, body = read_status(sock)
    assert code == "FAILED_PRECONDITION" and body == b""
    assert "FAILED" in message
    assert server.store.list_checkpoints(job_id) == []


# ---------------------------------------------------------------- falling back, resuming

def test_without_a_data_port_clients_use_the_streams(serve_coordinator, tmp_path, caplog):
    server = serve_coordinator(data_port=None)
    assert server.data_port is None and server.settings.data_port is None
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    with caplog.at_level(logging.WARNING, logger="dptrain.client"):
        worker.upload_checkpoint(ckpt)
    assert not worker.data_port
    assert [r.getMessage() for r in caplog.records] == [
        f"coordinator {server.address}: it has no data port; checkpoint transfers use the "
        f"gRPC streams"]
    with Client(server.address, token=server.token) as client:
        client.download_checkpoint(job_id, dest=tmp_path / "out")  # no ticket: chunks
        assert not client.data_port  # told so once, and it asks no more
    assert (tmp_path / "out").read_bytes() == (ckpt / MODEL_FILE).read_bytes()
    assert not _raw_ticket(server, job_id).HasField("data")


def test_an_unreachable_data_port_falls_back_once_for_good(server, tmp_path, caplog):
    forward = Forwarder(server.port)  # gRPC gets through; the data port does not
    try:
        _, worker = running_job(server, address=f"127.0.0.2:{server.port}")
        ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
        user = Client(f"127.0.0.2:{server.port}", token=server.token)
        with caplog.at_level(logging.WARNING, logger="dptrain.client"), user:
            worker.upload_checkpoint(ckpt)
            user.download_checkpoint(worker.job_id, dest=tmp_path / "out")
            user.download_checkpoint(worker.job_id, dest=tmp_path / "again")
            assert not worker.data_port and not user.data_port
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
            f"coordinator 127.0.0.2:{server.port}: its data port is unreachable"] * 2
        assert (tmp_path / "out").read_bytes() == (ckpt / MODEL_FILE).read_bytes()
        assert (tmp_path / "again").read_bytes() == (ckpt / MODEL_FILE).read_bytes()
    finally:
        forward.close()


def test_dptrain_download_takes_the_streams_when_told(server, state_dir, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    worker.upload_checkpoint(ckpt)
    forward = Forwarder(server.port)  # the data port is out of reach this way
    try:
        address = f"127.0.0.2:{server.port}"
        default = run_cli(address, state_dir, "download", job_id, "-o", str(tmp_path / "a"))
        streams = run_cli(address, state_dir, "download", job_id, "-o", str(tmp_path / "b"),
                          "--no-data-port")
    finally:
        forward.close()
    assert (default.returncode, streams.returncode) == (0, 0), default.stderr + streams.stderr
    assert f"coordinator {address}: its data port is unreachable" in default.stderr
    assert "data port" not in streams.stderr  # it never asked for one
    for out in ("a", "b"):
        assert (tmp_path / out).read_bytes() == (ckpt / MODEL_FILE).read_bytes()


def test_a_broken_data_connection_is_resumed_from_the_part_kept(server, tmp_path):
    job_id, worker = running_job(server)
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 1000)  # 4 MB
    worker.upload_checkpoint(ckpt)
    grpc_forward = Forwarder(server.port)
    data_forward = Forwarder(server.data_port, cut_after=1_500_000 + len(b"OK 0 \n"))
    resumed = []
    try:
        with Client(f"127.0.0.2:{server.port}", token=server.token) as client:
            got = client.download_checkpoint(
                job_id, dest=tmp_path / "out",
                on_progress=lambda p: resumed.append(p.resumed_at) if p.resumed_at else None)
            assert client.data_port
    finally:
        grpc_forward.close()
        data_forward.close()
    assert data_forward.connections == 2
    assert resumed and resumed[0] == 1_500_000  # from the bytes the part kept
    assert (tmp_path / "out").read_bytes() == (ckpt / MODEL_FILE).read_bytes()
    assert got.digest == _blake3(ckpt / MODEL_FILE)


# ---------------------------------------------------------------- TLS and settings

def test_under_TLS_the_data_port_speaks_TLS_verified_by_the_ca(serve_coordinator, tmp_path):
    d = tmp_path / "tls"
    assert subprocess.run([DPTRAIN, "tls", "init", str(d), "--host", "localhost"],
                          capture_output=True, timeout=120).returncode == 0
    server = serve_coordinator(tls_cert=d / "server.pem", tls_key=d / "server.key",
                               tls_ca=d / "ca.pem")
    address = f"localhost:{server.port}"
    with Client(address, token=server.token, tls_ca=d / "ca.pem") as c:
        job = c.submit_job(SPEC)
    token = new_token()
    server.store.transition(job.id, JobState.QUEUED, JobState.RUNNING,
                            token_hash=hash_token(token), placement={"localhost": 1})
    ckpt = linear_checkpoint(tmp_path / "ckpt", 1, 300)
    with WorkerClient(address, job.id, token, tls_ca=d / "ca.pem") as worker, \
            Client(address, token=server.token, tls_ca=d / "ca.pem") as user:
        worker.upload_checkpoint(ckpt)
        user.download_checkpoint(job.id, dest=tmp_path / "out")
        fetched = Path(worker.fetch_checkpoint(tmp_path / "fetched"))
        assert worker.data_port and user.data_port
    assert "WorkerService/UploadCheckpoint" not in server.metrics.render(server.store)
    assert (tmp_path / "out").read_bytes() == (ckpt / MODEL_FILE).read_bytes()
    assert _same_files(fetched, ckpt)
    with socket.create_connection(("127.0.0.1", server.data_port)) as plain:
        plain.sendall(bytes(32))  # not a TLS handshake: at most a TLS alert comes back
        assert _receive_all(plain)[:1] in (b"", b"\x15")


def test_the_data_port_defaults_to_the_gRPC_port_plus_one(serve_coordinator, tmp_path):
    port = free_port()  # and the one after it
    server = serve_coordinator(port=port, data_port=DATA_PORT_AUTO)
    assert (server.port, server.data_port, server.settings.data_port) == (port, port + 1,
                                                                        port + 1)


def test_a_taken_data_port_stops_the_start_and_frees_the_gRPC_port(state_dir):
    port = free_port()
    with socket.create_server(("127.0.0.1", port + 1)):
        with pytest.raises(ServerConfigError, match=rf"^cannot listen on 127\.0\.0\.1:"
                           rf"{port + 1} for the data port \(--data-port N\|off\): "):
            serve(ServerSettings(state_dir, port=port))
    with serve(ServerSettings(state_dir, port=port)) as server:  # nothing was left behind
        assert server.data_port == port + 1


def test_serve_takes_data_port_off_or_a_number(tmp_path):
    chosen = free_port()
    for option, shown in (("off", "off"), (str(chosen), str(chosen))):
        process = ServeProcess(tmp_path / "state", tmp_path / f"serve-{option}.log",
                             "--data-port", option)
        process.start()
        try:
            with process.client() as client:
                assert client.health() == "SERVING"
        finally:
            process.stop()
        assert (f"dptrain coordinator listening on {process.address} (data port {shown}) with"
                in (tmp_path / f"serve-{option}.log").read_text())
    bad = subprocess.run([DPTRAIN, "serve", "--data-port", "nine"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].endswith(
        "argument --data-port: must be a port number 0..65535 or off, got 'nine'")
