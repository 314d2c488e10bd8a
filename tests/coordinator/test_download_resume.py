"""Downloads that resume, against a REAL coordinator: DownloadCheckpoint's offset (the rest of
the file from there; beyond the file OUT_OF_RANGE naming the field), and a `dptrain serve`
killed with SIGKILL mid-download and started again on the same state directory while the same
`Client.download_checkpoint` call goes on: it resumes from the bytes it kept and saves the
file only once the whole of it hashes to the manifest's digest. DownloadCheckpoint's length
(a byte range, and where it stops), and files of sizes around the chunk and range boundaries
fetched as ranges over several streams, bit for bit, an old sha256 one among them."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import blake3
import grpc
import numpy as np
import pytest
from jobkit import TINY_SPEC, ServeProcess

from dptrain import engine
from dptrain.coordinator.api.checkpoint_upload import read_checkpoint_directory
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.api.records import JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.client.download_parts import FIRST_RANGE_BYTES
from dptrain.coordinator.server.checkpoint_store import store_checkpoint
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.checkpoint import MODEL_FILE, write_checkpoint
from dptrain.worker.checkpoint_manifest import write_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SPEC = {**TINY_SPEC, "name": "big", "workers": 1}


def _stored_checkpoint(server, tmp_path: Path, width: int) -> tuple[str, Path]:
    """A finished job with one stored checkpoint of a `width` x `width` linear model; returns
    the job's id and the checkpoint's model file as the worker wrote it (the reference)."""
    with Client(server.address, token=server.token) as client:
        job = client.submit_job(SPEC)
    engine.manual_seed(0)
    model = engine.nn.Linear(width, width)
    optimizer = engine.optim.SGD(model.parameters(), lr=0.1)
    path = write_checkpoint(tmp_path / "ckpt", 1, model.state_dict(), optimizer.state_dict(),
                            {"epoch": 0, "position": 1, "metrics": {}, "spec": SPEC})
    store_checkpoint(*read_checkpoint_directory(job.id, path), server.store, server.blobs)
    server.store.transition(job.id, JobState.QUEUED, JobState.CANCELLED)
    return job.id, Path(path) / MODEL_FILE


@pytest.fixture
def small(serve_coordinator, tmp_path):
    server = serve_coordinator(cluster=Cluster.local(1))
    job_id, reference = _stored_checkpoint(server, tmp_path, 600)
    return server, job_id, reference.read_bytes()


def _download(server, job_id: str, offset: int, length: int = 0
              ) -> list[pb.DownloadCheckpointResponse]:
    with grpc.insecure_channel(server.address) as channel:
        return list(pb_grpc.CoordinatorStub(channel).DownloadCheckpoint(
            pb.DownloadCheckpointRequest(job_id=job_id, offset=offset, length=length),
            metadata=bearer_metadata(server.token), timeout=60))


@pytest.mark.parametrize("offset", [0, 1, 1 << 20, "size-1", "size"])
def test_an_offset_sends_the_rest_of_the_file_described_whole(small, offset):
    server, job_id, data = small
    offset = {"size-1": len(data) - 1, "size": len(data)}.get(offset, offset)
    first, *rest = _download(server, job_id, offset)
    assert first.info.file.size == len(data)  # the whole file's size and digest
    assert first.info.file.blake3 == blake3.blake3(data).hexdigest()
    assert first.info.end == len(data)
    assert b"".join(m.chunk for m in rest) == data[offset:]


@pytest.mark.parametrize("offset, length", [
    (0, 1), (1, CHUNK_BYTES), (CHUNK_BYTES - 1, 2), (CHUNK_BYTES, CHUNK_BYTES + 1),
    ("size-1", 1), ("size-1", 5), ("size", 3), (7, "size"),
])
def test_a_length_sends_that_range_and_says_where_it_stops(small, offset, length):
    server, job_id, data = small
    size = len(data)
    offset = {"size-1": size - 1, "size": size}.get(offset, offset)
    length = size if length == "size" else length
    end = min(size, offset + length)  # a range past the end stops at the end
    first, *rest = _download(server, job_id, offset, length)
    assert (first.info.file.size, first.info.end) == (size, end)
    assert b"".join(m.chunk for m in rest) == data[offset:end]


@pytest.mark.parametrize("offset, length, rule", [
    ("size+1", 0, "offset: must be at most the file's size ({size} bytes), got {offset}"),
    (-1, 0, "offset: must be >= 0, got -1"),
    (0, -1, "length: must be >= 0, got -1"),
])
def test_an_offset_beyond_the_file_or_a_negative_length_is_out_of_range(
        small, offset, length, rule):
    server, job_id, data = small
    offset = len(data) + 1 if offset == "size+1" else offset
    with pytest.raises(grpc.RpcError) as info:
        _download(server, job_id, offset, length)
    assert info.value.code() is grpc.StatusCode.OUT_OF_RANGE
    assert info.value.details() == rule.format(size=len(data), offset=offset)
    assert _download(server, job_id, 0)[0].info.file.size == len(data)  # still serving


def _stored_bytes(server, tmp_path: Path, data: bytes, algorithm: str = "blake3") -> str:
    """A finished job whose one checkpoint's model file is `data`; returns the job's id."""
    with Client(server.address, token=server.token) as client:
        job = client.submit_job(SPEC)
    path = tmp_path / "step-00000001"
    path.mkdir()
    (path / MODEL_FILE).write_bytes(data)
    write_manifest(path, {"step": 1}, [MODEL_FILE], algorithm)
    store_checkpoint(*read_checkpoint_directory(job.id, path), server.store, server.blobs)
    server.store.transition(job.id, JobState.QUEUED, JobState.CANCELLED)
    return job.id


@pytest.mark.parametrize("size, streams", [
    (0, 3), (1, 3), (CHUNK_BYTES - 1, 3), (CHUNK_BYTES, 3), (FIRST_RANGE_BYTES - 1, 3),
    (FIRST_RANGE_BYTES, 3), (FIRST_RANGE_BYTES + 1, 3), (FIRST_RANGE_BYTES + 1, 2),
    (FIRST_RANGE_BYTES + 3 * CHUNK_BYTES + 7, 2), (FIRST_RANGE_BYTES + 3 * CHUNK_BYTES + 7, 4),
])
def test_ranges_over_several_streams_make_the_file_bit_for_bit(
        serve_coordinator, tmp_path, size, streams):
    server = serve_coordinator(cluster=Cluster.local(1))
    data = random.Random(size).randbytes(size)
    job_id = _stored_bytes(server, tmp_path, data)
    with Client(server.address, token=server.token) as client:
        got = client.download_checkpoint(job_id, dest=tmp_path / "m.safetensors",
                                         streams=streams)
    assert (tmp_path / "m.safetensors").read_bytes() == data
    assert (got.size, got.digest) == (size, blake3.blake3(data).hexdigest())
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["m.safetensors"]


def test_an_old_sha256_checkpoint_comes_in_ranges_and_loads(serve_coordinator, tmp_path):
    # A model file as dptrain wrote it before BLAKE3 (its manifest lists sha256), larger
    # than the first range, so it comes over several streams and is hashed whole after.
    server = serve_coordinator(cluster=Cluster.local(1))
    engine.manual_seed(0)
    model = engine.nn.Linear(1100, 1100)  # 4.8 MB of float32
    reference = tmp_path / "written"
    engine.save(model.state_dict(), reference)
    data = reference.read_bytes()
    assert len(data) > FIRST_RANGE_BYTES
    job_id = _stored_bytes(server, tmp_path, data, "sha256")
    with Client(server.address, token=server.token) as client:
        got = client.download_checkpoint(job_id, dest=tmp_path / "m.safetensors", streams=3)
    assert (got.algorithm, got.digest) == ("sha256", hashlib.sha256(data).hexdigest())
    loaded = engine.load(tmp_path / "m.safetensors")
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(loaded[name].numpy(), tensor.numpy())


def test_a_coordinator_killed_mid_download_and_restarted_is_resumed(
        serve_coordinator, state_dir, tmp_path):
    server = serve_coordinator(cluster=Cluster.local(1))
    job_id, reference = _stored_checkpoint(server, tmp_path, 2048)  # a 16 MiB model file
    data = reference.read_bytes()
    server.stop(grace=0)
    coordinator = ServeProcess(state_dir, tmp_path / "serve.log")
    coordinator.start()
    restarted = threading.Thread(target=coordinator.start)
    seen = []

    def progress(p):
        seen.append(p)
        if p.done >= 2 << 20 and restarted.ident is None:
            coordinator.kill()  # mid-stream: the rest of the file never leaves the server
            restarted.start()   # on the same state directory and port, while we retry

    try:
        with coordinator.client() as client:
            # Enough tries to outlast a start-up on a busy machine (about 4 minutes).
            got = client.download_checkpoint(job_id, dest=tmp_path / "m.safetensors",
                                             on_progress=progress, retries=30)
        restarted.join()
    finally:
        coordinator.stop()
    assert (tmp_path / "m.safetensors").read_bytes() == data
    assert got.digest == blake3.blake3(data).hexdigest() and got.size == len(data)
    resumed = [p.resumed_at for p in seen if p.done == p.resumed_at]
    assert len(resumed) == 1 and 2 << 20 <= resumed[0] < len(data)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["m.safetensors"]
    assert not list(tmp_path.glob(".m.safetensors*"))
