"""`Client.download_checkpoint` verifies what it receives, whatever the server claims.

The coordinator checks a blob while streaming it, so a real coordinator never sends bytes that
fail their sha256; the client's own check guards the path between them. Here a real gRPC server
on a loopback port implements only the download RPC and streams bytes that do not match the
description it sends first: the real client must refuse them with DATA_LOSS and leave nothing
behind at the destination.
"""

from __future__ import annotations

import hashlib
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from dptrain.coordinator.client.client import Client, ClientError
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc

PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: more than one chunk
CHUNK = 1 << 20


class ScriptedDownloads(pb_grpc.CoordinatorServicer):
    """Streams `sent` for every download, described as `declared` bytes."""

    def __init__(self) -> None:
        self.declared, self.sent = PAYLOAD, PAYLOAD

    def DownloadCheckpoint(self, request, context):
        info = pb.DownloadInfo(step=7, file=pb.CheckpointFile(
            name=request.file or "model.safetensors", size=len(self.declared),
            sha256=hashlib.sha256(self.declared).hexdigest()))
        yield pb.DownloadCheckpointResponse(info=info)
        for i in range(0, len(self.sent), CHUNK):
            yield pb.DownloadCheckpointResponse(chunk=self.sent[i:i + CHUNK])


@pytest.fixture
def downloads():
    """``(servicer, client)``: a loopback server with `ScriptedDownloads`, a client of it."""
    servicer = ScriptedDownloads()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", token="unused", timeout=30) as client:
            yield servicer, client
    finally:
        server.stop(grace=None)


def _corrupt(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    return bytes(flipped)


def test_matching_bytes_are_saved(downloads, tmp_path):
    _, client = downloads  # the scripted server is a faithful one unless told otherwise
    got = client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors")
    assert got.step == 7 and got.size == len(PAYLOAD)
    assert (tmp_path / "m.safetensors").read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("sent", [
    pytest.param(_corrupt(PAYLOAD), id="one-flipped-bit"),
    pytest.param(PAYLOAD[:-1], id="one-byte-short"),
    pytest.param(PAYLOAD + b"\0", id="one-byte-too-many"),
])
def test_bytes_that_fail_the_declared_sha256_are_data_loss_and_leave_no_file(
        downloads, tmp_path, sent):
    servicer, client = downloads
    servicer.sent = sent
    expected = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(ClientError) as info:
        client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors")
    assert info.value.code == "DATA_LOSS"
    assert str(info.value) == (
        f"DATA_LOSS: model.safetensors of step 7: received {len(sent)} bytes hashing to "
        f"{hashlib.sha256(sent).hexdigest()}, expected {len(PAYLOAD)} bytes with sha256 "
        f"{expected}")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary part


def test_a_failed_download_leaves_an_existing_file_as_it_was(downloads, tmp_path):
    servicer, client = downloads
    servicer.sent = _corrupt(PAYLOAD)
    dest = tmp_path / "m.safetensors"
    dest.write_bytes(b"the previous download")
    with pytest.raises(ClientError, match="^DATA_LOSS: "):
        client.download_checkpoint("j-000000000001", dest=dest)
    assert dest.read_bytes() == b"the previous download"
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["m.safetensors"]
