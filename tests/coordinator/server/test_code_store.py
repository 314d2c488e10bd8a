"""A job's code through a REAL coordinator on loopback: UploadCode (the coordinator's token
only, content-addressed, hostile and oversized archives refused storing nothing), a job naming
it by digest, and FetchCode by the job's workers (verified, unpacked). No workers run here
(the jobs with code that train are in tests/coordinator/test_e2e_code.py)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import grpc
import pytest
from archives import HOSTILE, hostile

from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.records import JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.client.worker_client import WorkerClient
from dptrain.coordinator.server.checkpoint_store import referenced_blobs
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc
from dptrain.worker.code_archive import CodeArchiveError, pack_directory

MAX_CODE = 64 * 1024
#: A job that ships no code (an entrypoint must name shipped code: worker.module_policy).
SPEC = {"name": "zoo", "model": {"name": "mlp", "args": {"in_features": 4, "num_classes": 2}},
        "dataset": {"name": "digits"}, "optimizer": {"name": "sgd", "lr": 0.1},
        "batch_size": 8, "max_steps": 1, "workers": 2}


@pytest.fixture
def server(serve_coordinator):
    # No runner: jobs stay QUEUED until `_launch` does what the runner does when it starts one.
    return serve_coordinator(cluster=Cluster.local(4), max_code_bytes=MAX_CODE)


def _launch(server, job_id) -> str:
    """RUNNING, with a fresh worker token (as the runner's launch)."""
    token = new_token()
    server.store.transition(job_id, JobState.QUEUED, JobState.RUNNING,
                            token_hash=hash_token(token), placement={"localhost": 2})
    return token


@pytest.fixture
def client(server):
    with Client(server.address, token=server.token, timeout=10) as c:
        yield c


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text("import pkg.model\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "model.py").write_text("WIDTH = 3\n")
    return root


def stored(server) -> int:
    return sum(server.store.count_by_state().values())


def test_a_job_file_naming_code_ships_it_by_digest(server, client, project, tmp_path):
    (project / "job.yaml").write_text("name: own\nentrypoint: train.py --lr 0.1\nworkers: 2\n"
                                      "code: .\n")
    job = client.submit_job(project / "job.yaml")
    digest = hashlib.sha256(pack_directory(project).data).hexdigest()
    assert job.spec["code"] == f"sha256:{digest}" and server.blobs.exists(digest)
    # The job's workers fetch it: verified, unpacked where the runner's spec lives.
    token = _launch(server, job.id)
    with WorkerClient(server.address, job.id, token) as worker:
        target = worker.fetch_code(digest, tmp_path / "jobdir" / "code" / digest)
    assert (tmp_path / "jobdir" / "code" / digest / "pkg" / "model.py").read_text() == (
        "WIDTH = 3\n")
    assert target == str(tmp_path / "jobdir" / "code" / digest)
    # Restarts and a server restart keep the archive: a job names it.
    assert digest in referenced_blobs(server.store)


def test_uploading_the_same_code_twice_stores_it_once(server, client, project):
    data = pack_directory(project).data
    assert client.upload_code(data) == client.upload_code(data, chunk_size=7)
    assert sorted(server.blobs) == [hashlib.sha256(data).hexdigest()]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_invalid_argument_and_store_nothing(server, client, case):
    with pytest.raises(ClientError) as info:
        client.upload_code(hostile(HOSTILE[case]))
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.details.startswith("code: the archive is refused: member ")
    assert list(server.blobs) == []


def test_oversized_code_is_resource_exhausted_packed_or_unpacked(server, client):
    with pytest.raises(ClientError) as info:
        client.upload_code(b"\1" * (MAX_CODE + 1))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:  # small packed, large unpacked
        entry = tarfile.TarInfo("zeros.bin")
        entry.size = MAX_CODE * 4
        tar.addfile(entry, io.BytesIO(b"\0" * entry.size))
    assert len(buffer.getvalue()) < MAX_CODE
    with pytest.raises(ClientError) as info:
        client.upload_code(buffer.getvalue())
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert list(server.blobs) == []


def test_bytes_that_do_not_match_the_header_are_refused(server):
    data = b"some bytes"
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadCode(iter([
                pb.UploadCodeRequest(header=pb.CodeArchive(sha256="0" * 64, size=len(data))),
                pb.UploadCodeRequest(chunk=data)]), metadata=bearer_metadata(server.token))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("header.sha256: does not match the bytes sent")
    assert list(server.blobs) == []


def test_a_worker_token_may_not_upload_code(server, client, project):
    job = client.submit_job(SPEC)
    token = _launch(server, job.id)
    with WorkerClient(server.address, job.id, token) as worker, pytest.raises(ClientError) as e:
        worker.upload_code(pack_directory(project).data)
    assert e.value.code == "PERMISSION_DENIED"
    assert list(server.blobs) == []


@pytest.mark.parametrize("code, message", [
    ("src", "code: must name uploaded code as 'sha256:<digest>'"),
    ("sha256:" + "a" * 64, "code: names no uploaded archive (upload it first: UploadCode)"),
    ("sha256:xyz", "code: must be 'sha256:' and 64 lowercase hex digits"),
])
def test_a_spec_naming_code_the_server_does_not_hold_is_refused(server, code, message):
    # As a client in another language would send it (the Python client uploads first).
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        spec = pb.JobSpec(name="own", entrypoint="train.py", workers=2, code=code)
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitJob(pb.SubmitJobRequest(spec=spec), metadata=bearer_metadata(server.token))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(message), info.value.details()
    assert stored(server) == 0


def test_fetching_code_needs_a_job_with_code(server, client, tmp_path):
    job = client.submit_job(SPEC)  # no code
    token = _launch(server, job.id)
    with WorkerClient(server.address, job.id, token) as worker, pytest.raises(ClientError) as e:
        worker.fetch_code("a" * 64, tmp_path / "code")
    assert e.value.code == "NOT_FOUND"


def test_an_archive_damaged_on_the_servers_disk_is_refused_by_the_worker(
        server, client, project, tmp_path):
    data = pack_directory(project).data
    digest = client.upload_code(data)
    job = client.submit_job({**SPEC, "code": f"sha256:{digest}"})
    blob = server.blobs.get(digest)
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte flipped: as a disk error does
    blob.write_bytes(bytes(damaged))
    token = _launch(server, job.id)
    target = tmp_path / "jobdir" / "code" / digest
    with WorkerClient(server.address, job.id, token) as worker:
        with pytest.raises(CodeArchiveError) as info:
            worker.fetch_code(digest, target)
    # The server streams the bytes unhashed: the refusal is the worker's own check (a server
    # check would end the stream with a ClientError instead), naming the archive.
    assert str(info.value) == (
        f"DATA_LOSS: the code archive sha256:{digest} arrived hashing to sha256 "
        f"{hashlib.sha256(bytes(damaged)).hexdigest()}: damaged on the coordinator's disk or on "
        "the way; upload the code again and resubmit")
    assert not target.exists() and list(target.parent.iterdir()) == []


# ---------------------------------------------------------------- the listing kept at upload

def _own(digest: str, entrypoint: str) -> dict:
    return {"name": "own", "entrypoint": entrypoint, "workers": 2, "code": f"sha256:{digest}"}


def _listing(server, digest: str):
    return server.settings.state_dir / "code-listings" / f"{digest}.json"


def test_submissions_decide_from_the_listing_kept_at_upload_not_the_archive(
        server, client, project, tmp_path):
    data = pack_directory(project).data
    digest = client.upload_code(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the reference: tarfile's reading
        names = sorted(m.name for m in tar if m.isfile())
    assert names == ["pkg/__init__.py", "pkg/model.py", "train.py"]
    assert sorted(json.loads(_listing(server, digest).read_text())["files"]) == names
    # With the archive damaged on disk, a submission still decides by the listing: the
    # archive is not read (nor hashed) there ...
    blob = server.blobs.get(digest)
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    job = client.submit_job(_own(digest, "train.py --lr 0.1"))
    with pytest.raises(ClientError) as info:
        client.submit_job(_own(digest, "missing.py"))
    assert info.value.code == "INVALID_ARGUMENT" and "entrypoint" in str(info.value)
    # ... and the damage is refused where the bytes are used: by the job's workers.
    token = _launch(server, job.id)
    with WorkerClient(server.address, job.id, token) as worker:
        with pytest.raises(CodeArchiveError, match="^DATA_LOSS: the code archive"):
            worker.fetch_code(digest, tmp_path / "jobdir" / "code" / digest)


def test_a_changed_or_missing_listing_is_made_again_from_the_archive(server, client, project):
    digest = client.upload_code(pack_directory(project).data)
    path = _listing(server, digest)
    kept = json.loads(path.read_text())
    # A listing whose files no longer hash as recorded is not believed.
    path.write_text(json.dumps({**kept, "files": [*kept["files"], "evil.py"]}))
    with pytest.raises(ClientError) as info:
        client.submit_job(_own(digest, "evil.py"))
    assert info.value.code == "INVALID_ARGUMENT" and "entrypoint" in str(info.value)
    assert json.loads(path.read_text()) == kept
    # Nor one naming another archive; and a missing one (an older upload) is made again.
    other = {**kept, "archive": "sha256:" + "0" * 64}
    path.write_text(json.dumps(other))
    assert client.submit_job(_own(digest, "train.py")).state is JobState.QUEUED
    assert json.loads(path.read_text()) == kept
    path.unlink()
    assert client.submit_job(_own(digest, "train.py")).state is JobState.QUEUED
    assert json.loads(path.read_text()) == kept


def test_a_freed_archives_listing_goes_at_the_next_upkeep_and_others_stay(
        serve_coordinator, project, tmp_path):
    server = serve_coordinator(cluster=Cluster.local(4), max_code_bytes=MAX_CODE)
    other_project = tmp_path / "other"
    other_project.mkdir()
    (other_project / "train.py").write_text("print('other')\n")
    with Client(server.address, token=server.token, timeout=10) as client:
        freed = client.upload_code(pack_directory(project).data)
        kept = client.upload_code(pack_directory(other_project).data)
        doomed = client.submit_job(_own(freed, "train.py"))
        client.submit_job(_own(kept, "train.py"))
        client.cancel_job(doomed.id)
        client.delete_job(doomed.id)
    assert not server.blobs.exists(freed) and server.blobs.exists(kept)
    assert _listing(server, freed).exists()  # until the next upkeep round or start
    server.stop()
    server = serve_coordinator(cluster=Cluster.local(4), max_code_bytes=MAX_CODE,
                               port=server.port)
    assert not _listing(server, freed).exists()
    assert _listing(server, kept).exists()
    with Client(server.address, token=server.token, timeout=10) as client:
        with pytest.raises(ClientError) as info:  # as before the listings: upload it again
            client.submit_job(_own(freed, "train.py"))
        assert info.value.code == "INVALID_ARGUMENT" and "UploadCode" in str(info.value)
