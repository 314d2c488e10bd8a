"""Downloads that resume, against a REAL coordinator: DownloadCheckpoint's offset (the rest of
the file from there; beyond the file OUT_OF_RANGE naming the field), and a `dptrain serve`
killed with SIGKILL mid-download and started again on the same state directory while the same
`Client.download_checkpoint` call goes on: it resumes from the bytes it kept and saves the
file only once the whole of it hashes to the manifest's digest."""

from __future__ import annotations

import threading
from pathlib import Path

import blake3
import grpc
import pytest
from jobkit import TINY_SPEC, ServeProcess

from dptrain import engine
from dptrain.coordinator.api.checkpoint_upload import read_checkpoint_directory
from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.records import JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.server.checkpoint_store import store_checkpoint
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.checkpoint import MODEL_FILE, write_checkpoint

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


def _download(server, job_id: str, offset: int) -> list[pb.DownloadCheckpointResponse]:
    with grpc.insecure_channel(server.address) as channel:
        return list(pb_grpc.CoordinatorStub(channel).DownloadCheckpoint(
            pb.DownloadCheckpointRequest(job_id=job_id, offset=offset),
            metadata=bearer_metadata(server.token), timeout=60))


@pytest.mark.parametrize("offset", [0, 1, 1 << 20, "size-1", "size"])
def test_an_offset_sends_the_rest_of_the_file_described_whole(small, offset):
    server, job_id, data = small
    offset = {"size-1": len(data) - 1, "size": len(data)}.get(offset, offset)
    first, *rest = _download(server, job_id, offset)
    assert first.info.file.size == len(data)  # the whole file's size and digest
    assert first.info.file.blake3 == blake3.blake3(data).hexdigest()
    assert b"".join(m.chunk for m in rest) == data[offset:]


@pytest.mark.parametrize("offset, rule", [
    ("size+1", "offset: must be at most the file's size ({size} bytes), got {offset}"),
    (-1, "offset: must be >= 0, got -1"),
])
def test_an_offset_beyond_the_file_is_out_of_range(small, offset, rule):
    server, job_id, data = small
    offset = len(data) + 1 if offset == "size+1" else offset
    with pytest.raises(grpc.RpcError) as info:
        _download(server, job_id, offset)
    assert info.value.code() is grpc.StatusCode.OUT_OF_RANGE
    assert info.value.details() == rule.format(size=len(data), offset=offset)


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
