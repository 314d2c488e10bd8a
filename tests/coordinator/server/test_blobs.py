"""BlobStore: content addressing, atomic writes, verification on read, garbage.

Retention and the fall-back past damaged checkpoints are `coordinator.checkpoints`'s: see
test_jobs.py."""

from __future__ import annotations

import hashlib
import os
import stat
import time

import blake3
import pytest

from dptrain.coordinator.api.errors import (
    BlobCorrupted,
    BlobNotFound,
    BlobTooLarge,
    ChecksumMismatch,
    ValidationError,
)
from dptrain.coordinator.server import blobs as blobs_module
from dptrain.coordinator.server.blobs import BlobStore, blob_id, parse_blob_id

DATA = bytes(range(256)) * 1000  # 256 kB
SHA = hashlib.sha256(DATA).hexdigest()
B3 = blake3.blake3(DATA).hexdigest()


@pytest.fixture
def blobs(tmp_path):
    return BlobStore(tmp_path / "blobs")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_stores_bytes_under_their_sha256(blobs):
    assert blobs.put(DATA) == (SHA, len(DATA))
    path = blobs.root / SHA[:2] / SHA[2:]
    assert path.read_bytes() == DATA
    assert _files(blobs.root) == [f"{SHA[:2]}/{SHA[2:]}"]
    assert list(blobs) == [SHA] and blobs.exists(SHA) and blobs.size(SHA) == len(DATA)
    assert blobs.get(SHA) == path


def test_blake3_blobs_live_apart_named_by_algorithm_and_digest(blobs):
    name = f"blake3:{B3}"
    assert blobs.put(DATA, algorithm="blake3") == (name, len(DATA))
    assert blobs.put(DATA, expected=name) == (name, len(DATA))
    path = blobs.root / "blake3" / B3[:2] / B3[2:]
    assert path.read_bytes() == DATA
    assert blobs.put(DATA) == (SHA, len(DATA))  # the same bytes as a sha256 blob: a second one
    assert _files(blobs.root) == [f"{SHA[:2]}/{SHA[2:]}", f"blake3/{B3[:2]}/{B3[2:]}"]
    assert sorted(blobs) == sorted([SHA, name])
    assert blobs.get(name) == path and blobs.verify(name) == len(DATA)
    assert blob_id("blake3", B3) == name and parse_blob_id(name) == ("blake3", B3)
    assert blob_id("sha256", SHA) == SHA and parse_blob_id(SHA) == ("sha256", SHA)


def test_a_corrupted_blake3_blob_is_detected_unless_the_reader_verifies_itself(blobs):
    name, _ = blobs.put(DATA, algorithm="blake3")
    path = blobs.get(name)
    path.write_bytes(b"x" + DATA[1:])
    with pytest.raises(BlobCorrupted, match=f"blob {name} is corrupted"):
        blobs.verify(name)
    assert b"".join(blobs.read(name, verify=False)) == b"x" + DATA[1:]


def test_put_accepts_a_stream_of_chunks_and_stores_content_once(blobs):
    chunks = (DATA[i:i + 7000] for i in range(0, len(DATA), 7000))
    assert blobs.put(chunks, expected=SHA) == (SHA, len(DATA))
    assert blobs.put([bytearray(DATA[:10]), memoryview(DATA[10:])]) == (SHA, len(DATA))
    assert list(blobs) == [SHA]
    assert b"".join(blobs.read(SHA, chunk_size=4096)) == DATA
    assert all(len(c) <= 4096 for c in blobs.read(SHA, chunk_size=4096))


def test_empty_blob(blobs):
    sha, size = blobs.put(b"")
    assert (sha, size) == (hashlib.sha256(b"").hexdigest(), 0)
    assert list(blobs.read(sha)) == []


def test_no_partial_blob_is_ever_visible(blobs):
    seen = []

    def upload():
        for i in range(0, len(DATA), 10_000):
            seen.append((list(blobs), blobs.exists(SHA)))
            yield DATA[i:i + 10_000]

    blobs.put(upload())
    assert seen and all(s == ([], False) for s in seen)
    assert list(blobs) == [SHA]


def test_a_failing_upload_leaves_nothing(blobs):
    def broken():
        yield DATA[:1000]
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        blobs.put(broken())
    assert _files(blobs.root) == [] and list(blobs) == []


def test_expected_sha256_mismatch_is_refused_and_nothing_stored(blobs):
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ChecksumMismatch) as e:
        blobs.put(DATA, expected=wrong)
    assert (e.value.expected, e.value.actual, e.value.size) == (wrong, SHA, len(DATA))
    assert "nothing was stored" in str(e.value)
    assert _files(blobs.root) == []


@pytest.mark.parametrize("bad", ["abc", SHA.upper(), SHA + "0", 42, f"sha256:{SHA}",
                                 f"md5:{SHA}", f"blake3:{B3.upper()}", "blake3:"])
def test_malformed_expected_names_the_field(blobs, bad):
    with pytest.raises(ValidationError, match="expected: must be a sha256 .64 lowercase hex"):
        blobs.put(DATA, expected=bad)
    with pytest.raises(ValidationError, match="algorithm: must be one of blake3, sha256"):
        blobs.put(DATA, algorithm="md5")


def test_size_limit(tmp_path):
    small = BlobStore(tmp_path, max_size=1000)
    with pytest.raises(BlobTooLarge, match="at most 1000 bytes"):
        small.put([DATA[:600], DATA[600:1200]])
    assert _files(tmp_path) == []
    assert small.put(DATA[:1000])[1] == 1000


def test_put_fsyncs_the_file_before_the_rename_and_the_directory_after(blobs, monkeypatch):
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        log.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(blobs_module.os, "fsync", fsync)
    monkeypatch.setattr(blobs_module.os, "replace", replace)
    blobs.put(DATA)
    assert log.index("fsync file") < log.index("rename") < len(log) - 1
    assert log[-1] == "fsync dir"


def _corrupt(blobs, sha, offset=1234):
    path = blobs.root / sha[:2] / sha[2:]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_blob_is_detected(blobs):
    blobs.put(DATA)
    _corrupt(blobs, SHA)
    with pytest.raises(BlobCorrupted, match=f"blob {SHA} is corrupted") as e:
        blobs.verify(SHA)
    assert e.value.sha256 == SHA and e.value.size == len(DATA)
    with pytest.raises(BlobCorrupted):
        blobs.get(SHA)
    received = []
    with pytest.raises(BlobCorrupted):  # a download stream ends with an error, not success
        for chunk in blobs.read(SHA):
            received.append(chunk)
    assert sum(map(len, received)) == len(DATA)


def test_a_truncated_blob_is_detected_and_a_new_upload_repairs_it(blobs):
    blobs.put(DATA)
    path = blobs.root / SHA[:2] / SHA[2:]
    path.write_bytes(DATA[:100])
    with pytest.raises(BlobCorrupted):
        blobs.verify(SHA)
    blobs.put(DATA)
    assert blobs.verify(SHA) == len(DATA)


def test_missing_blobs(blobs):
    with pytest.raises(BlobNotFound):
        blobs.read(SHA)  # at the call, before any chunk is asked for
    for call in (blobs.verify, blobs.get, blobs.size):
        with pytest.raises(BlobNotFound):
            call(SHA)
    assert not blobs.exists(SHA) and blobs.delete(SHA) is False
    assert blobs.modified(SHA) == float("inf")  # never old enough to be collected
    with pytest.raises(ValidationError, match="sha256"):
        blobs.exists("../../etc/passwd")


def test_delete(blobs):
    blobs.put(DATA)
    assert blobs.delete(SHA) is True
    assert list(blobs) == [] and not blobs.exists(SHA)


def test_collect_garbage_spares_referenced_and_recent_files(blobs):
    keep_sha, _ = blobs.put(b"referenced")
    old_sha, _ = blobs.put(b"orphan")
    young_sha, _ = blobs.put(b"just uploaded")
    stale_tmp = blobs.root / "tmp" / "crashed-upload.tmp"
    stale_tmp.write_bytes(b"half")
    past = time.time() - 7200
    for sha in (keep_sha, old_sha):
        os.utime(blobs.root / sha[:2] / sha[2:], (past, past))
    os.utime(stale_tmp, (past, past))
    assert blobs.collect_garbage({keep_sha}, min_age=3600) == [old_sha]
    assert sorted(blobs) == sorted([keep_sha, young_sha]) and not stale_tmp.exists()

