"""`Client.download_checkpoint` verifies what it receives, whatever the server claims, and
resumes a broken stream from the bytes it kept.

The coordinator streams a stored file without hashing it again (each side of a transfer hashes
once), so the client's check is the one that catches a file damaged on the server's disk or on
the way. Here a real gRPC server on a loopback port implements only the download RPC and
streams bytes that do not match the description it sends first (a BLAKE3 digest, or a sha256
one as for checkpoints written before BLAKE3): the real client must refuse them with DATA_LOSS
and leave nothing behind at the destination.
"""

from __future__ import annotations

import hashlib
import random
import threading
from concurrent import futures
from pathlib import Path

import blake3
import grpc
import pytest
from jobkit import run_cli

from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.client.download_parts import FIRST_RANGE_BYTES
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc

PAYLOAD = bytes(range(256)) * 15000  # 3.84 MB: several chunks
CHUNK = 1 << 20
HASHERS = {"blake3": blake3.blake3, "sha256": hashlib.sha256}  # the references


class ScriptedDownloads(pb_grpc.CoordinatorServicer):
    """Streams `sent` for every download from the request's offset, described as `declared`
    bytes hashed with `algorithm`; while `drops` is above 0, a stream breaks off with
    UNAVAILABLE after one chunk (as a dropped connection does), counting it down, and the
    server is `down` after it when `down_after_drop` (every call UNAVAILABLE at once). The
    requests' offsets are kept in `offsets`, their ``(offset, length)`` in `requests`.

    By default it behaves as a server that predates byte ranges (it ignores ``length`` and
    leaves ``DownloadInfo.end`` 0); when `ranged`, it sends at most ``length`` bytes and says
    where it stops, except that a stream from an offset in `drop_at` breaks off after one
    chunk (once per offset), and a stream from an offset in `skew` sends that many bytes more
    (or, negative, fewer) than its range."""

    def __init__(self) -> None:
        self.declared, self.sent, self.algorithm = PAYLOAD, PAYLOAD, "blake3"
        self.drops, self.offsets, self.down, self.down_after_drop = 0, [], False, False
        self.ranged, self.requests, self.drop_at, self.skew = False, [], set(), {}
        self.lock = threading.Lock()

    def DownloadCheckpoint(self, request, context):
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is down")
        with self.lock:
            self.offsets.append(request.offset)
            self.requests.append((request.offset, request.length))
        end = len(self.sent)
        if self.ranged and request.length:
            end = min(end, request.offset + request.length)
        digest = HASHERS[self.algorithm](self.declared).hexdigest()
        info = pb.DownloadInfo(step=7, file=pb.CheckpointFile(
            name=request.file or "model.safetensors", size=len(self.declared),
            **{self.algorithm: digest}), end=end if self.ranged else 0)
        yield pb.DownloadCheckpointResponse(info=info)
        end += self.skew.get(request.offset, 0)
        for i in range(request.offset, end, CHUNK):
            yield pb.DownloadCheckpointResponse(chunk=self.sent[i:min(i + CHUNK, end)])
            with self.lock:
                drop = self.drops > 0 or request.offset in self.drop_at
                self.drops = max(0, self.drops - 1)
                self.drop_at.discard(request.offset)
            if drop:
                self.down = self.down_after_drop
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped")


@pytest.fixture
def downloads():
    """``(servicer, client)``: a loopback server with `ScriptedDownloads`, a client of it."""
    servicer = ScriptedDownloads()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
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


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_matching_bytes_are_saved(downloads, tmp_path, algorithm):
    servicer, client = downloads  # the scripted server is a faithful one unless told otherwise
    servicer.algorithm = algorithm
    got = client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors")
    assert got.step == 7 and got.size == len(PAYLOAD)
    assert (got.algorithm, got.digest) == (algorithm, HASHERS[algorithm](PAYLOAD).hexdigest())
    assert (tmp_path / "m.safetensors").read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
@pytest.mark.parametrize("sent", [
    pytest.param(_corrupt(PAYLOAD), id="one-flipped-bit"),
    pytest.param(PAYLOAD[:-1], id="one-byte-short"),
    pytest.param(PAYLOAD + b"\0", id="one-byte-too-many"),
])
def test_bytes_that_fail_the_declared_digest_are_data_loss_and_leave_no_file(
        downloads, tmp_path, sent, algorithm):
    servicer, client = downloads
    servicer.sent, servicer.algorithm = sent, algorithm
    expected = HASHERS[algorithm](PAYLOAD).hexdigest()
    with pytest.raises(ClientError) as info:
        client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors")
    assert info.value.code == "DATA_LOSS"
    assert str(info.value) == (
        f"DATA_LOSS: model.safetensors of step 7: received {len(sent)} bytes hashing to "
        f"{algorithm} {HASHERS[algorithm](sent).hexdigest()}, expected {len(PAYLOAD)} bytes "
        f"with {algorithm} {expected}")
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


def test_a_broken_stream_resumes_from_the_bytes_received(downloads, tmp_path):
    servicer, client = downloads
    servicer.drops = 2
    seen = []
    got = client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors",
                                     on_progress=seen.append)
    assert servicer.offsets == [0, CHUNK, 2 * CHUNK]  # each try asked for the rest only
    assert (tmp_path / "m.safetensors").read_bytes() == PAYLOAD
    assert got.digest == blake3.blake3(PAYLOAD).hexdigest() and got.size == len(PAYLOAD)
    assert [p.resumed_at for p in seen if p.done == p.resumed_at] == [CHUNK, 2 * CHUNK]
    assert seen[-1].done == len(PAYLOAD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _give_up_after_one_chunk(servicer, client, dest):
    """A download that gives up after receiving one chunk (the server down from then on)."""
    servicer.drops, servicer.down_after_drop = 1, True
    with pytest.raises(ClientError, match="^UNAVAILABLE: .*the coordinator is down"):
        client.download_checkpoint("j-000000000001", dest=dest,
                                   retries=0)  # one more try after the progress, in vain
    servicer.down = False


def test_a_part_left_by_an_earlier_call_is_resumed(downloads, tmp_path):
    servicer, client = downloads
    _give_up_after_one_chunk(servicer, client, tmp_path / "m.safetensors")
    [part] = tmp_path.iterdir()  # kept, named after the file's digest
    assert part.name == f".m.safetensors.blake3-{blake3.blake3(PAYLOAD).hexdigest()[:16]}.part"
    assert part.read_bytes() == PAYLOAD[:CHUNK]
    client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors")
    # The first answer describes the file; the part's bytes are not asked for again.
    assert servicer.offsets == [0, 0, CHUNK]
    assert (tmp_path / "m.safetensors").read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_damaged_kept_part_fails_the_whole_file_and_is_deleted(downloads, tmp_path):
    servicer, client = downloads
    _give_up_after_one_chunk(servicer, client, tmp_path / "m.safetensors")
    [part] = tmp_path.iterdir()
    part.write_bytes(_corrupt(part.read_bytes()))  # the prefix changed on the client's disk
    with pytest.raises(ClientError) as info:
        client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors")
    damaged = _corrupt(PAYLOAD[:CHUNK]) + PAYLOAD[CHUNK:]
    assert str(info.value) == (
        f"DATA_LOSS: model.safetensors of step 7: received {len(PAYLOAD)} bytes hashing to "
        f"blake3 {blake3.blake3(damaged).hexdigest()}, expected {len(PAYLOAD)} bytes with "
        f"blake3 {blake3.blake3(PAYLOAD).hexdigest()}")
    assert list(tmp_path.iterdir()) == []


def test_dptrain_download_shows_the_resumption_in_its_progress_bar(downloads, tmp_path):
    servicer, client = downloads
    servicer.drops = 1
    state = tmp_path / "state"
    state.mkdir()
    (state / "token").write_text("unused")
    got = run_cli(client.address, state, "download", "j-000000000001", "-o",
                  str(tmp_path / "m.safetensors"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "m.safetensors").read_bytes() == PAYLOAD
    assert "model.safetensors of step 7 (resumed at 1.0 MiB)" in got.stderr
    assert got.stdout == (f"{tmp_path / 'm.safetensors'}: model.safetensors of step 7, "
                          f"{len(PAYLOAD)} bytes, blake3 {blake3.blake3(PAYLOAD).hexdigest()}\n")


# ------------------------------------------------- a file in byte ranges over several streams

M = CHUNK
BIG = random.Random(0).randbytes(10 * M + 7)  # beyond the first range; no two ranges alike
FIRST = FIRST_RANGE_BYTES  # 4 MiB
# Hand-computed from the rule "each stream one share": 2 streams take 5 MiB + 4 bytes each
# (the first asks for 4 MiB, then for the rest of its share); with 3 streams the first
# range is already more than a third, so the other two split the rest (3 MiB + 3.5 bytes).
RANGES = {2: [(0, FIRST), (FIRST, M + 4), (5 * M + 4, 5 * M + 3)],
          3: [(0, FIRST), (FIRST, 3 * M + 4), (7 * M + 4, 3 * M + 3)]}


@pytest.fixture
def ranged(downloads):
    """The scripted server honouring byte ranges, with a file of several ranges (fetched in
    ranges when a download asks for ``streams`` > 1)."""
    servicer, client = downloads
    servicer.ranged, servicer.declared, servicer.sent = True, BIG, BIG
    return servicer, client


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
@pytest.mark.parametrize("streams", [2, 3])
def test_a_file_comes_in_ranges_over_several_streams(ranged, tmp_path, streams, algorithm):
    servicer, client = ranged
    servicer.algorithm = algorithm
    seen = []
    got = client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors",
                                     streams=streams, on_progress=seen.append)
    assert sorted(servicer.requests) == RANGES[streams]
    assert (tmp_path / "m.safetensors").read_bytes() == BIG
    assert (got.size, got.digest) == (len(BIG), HASHERS[algorithm](BIG).hexdigest())
    assert seen[-1].done == len(BIG) and all(p.resumed_at is None for p in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_range_that_breaks_off_goes_on_from_where_it_stopped(ranged, tmp_path):
    servicer, client = ranged
    servicer.drop_at = {5 * M + 4}  # the second stream's range, after its first chunk
    seen = []
    client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors",
                               on_progress=seen.append, streams=2)
    assert sorted(servicer.requests) == sorted(
        RANGES[2] + [(6 * M + 4, 4 * M + 3)])  # only the rest of the broken range again
    assert (tmp_path / "m.safetensors").read_bytes() == BIG
    [resumed] = [p.resumed_at for p in seen if p.resumed_at is not None and
                 p.done == p.resumed_at]
    assert M < resumed < len(BIG)


@pytest.mark.parametrize("skew, rule", [
    (1, "the server sent 1 more bytes than asked for"),
    (-1, f"the stream ended at byte {5 * M + 3}"),
])
def test_a_range_sent_longer_or_shorter_than_asked_is_data_loss(ranged, tmp_path, skew, rule):
    servicer, client = ranged
    servicer.skew = {FIRST: skew}
    with pytest.raises(ClientError) as info:
        client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors",
                                   streams=2)
    assert str(info.value) == (f"DATA_LOSS: model.safetensors of step 7: the range of bytes "
                               f"{FIRST} to {5 * M + 4}: {rule}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_ranges_that_fail_the_digest_are_data_loss_and_leave_no_file(
        ranged, tmp_path, algorithm):
    servicer, client = ranged
    servicer.sent, servicer.algorithm = _corrupt(BIG), algorithm
    with pytest.raises(ClientError) as info:
        client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors",
                                   streams=2)
    assert str(info.value) == (
        f"DATA_LOSS: model.safetensors of step 7: received {len(BIG)} bytes hashing to "
        f"{algorithm} {HASHERS[algorithm](_corrupt(BIG)).hexdigest()}, expected {len(BIG)} "
        f"bytes with {algorithm} {HASHERS[algorithm](BIG).hexdigest()}")
    assert list(tmp_path.iterdir()) == []


def test_ranges_given_up_leave_a_part_without_gaps_that_a_later_call_finishes(
        ranged, tmp_path):
    servicer, client = ranged
    servicer.drop_at, servicer.down_after_drop = {5 * M + 4}, True
    with pytest.raises(ClientError, match="^UNAVAILABLE: "):
        client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors",
                                   retries=0, streams=2)
    [part] = tmp_path.iterdir()
    kept = part.read_bytes()
    # Cut back to the bytes before the first gap: at most the first stream's share and the
    # one chunk the broken range got (its rest never came).
    assert kept == BIG[:len(kept)] and len(kept) <= 6 * M + 4
    servicer.down, servicer.requests = False, []
    client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors", streams=2)
    # The first answer describes the file; the part's bytes are not asked for again.
    assert servicer.requests[0] == (0, FIRST) and min(servicer.requests[1:])[0] == len(kept)
    assert (tmp_path / "m.safetensors").read_bytes() == BIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_server_without_ranges_sends_the_whole_file_over_the_first_stream(
        downloads, tmp_path):
    servicer, client = downloads  # not ranged: it ignores length and leaves end 0
    servicer.declared = servicer.sent = BIG
    client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors", streams=4)
    assert servicer.requests == [(0, FIRST)]
    assert (tmp_path / "m.safetensors").read_bytes() == BIG


def test_one_stream_by_default_asks_for_the_whole_file(ranged, tmp_path):
    servicer, client = ranged
    client.download_checkpoint("j-000000000001", dest=tmp_path / "m.safetensors")
    assert servicer.requests == [(0, 0)]
    assert (tmp_path / "m.safetensors").read_bytes() == BIG
