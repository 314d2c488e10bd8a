"""write_hashed: what is written, its digest against hashlib's sha256 and the blake3 package,
fsync after the last byte, and every failure stopping the writer thread; write_at's ranges
written from several threads, and hash_file against the same references."""

from __future__ import annotations

import hashlib
import os
import sys
import threading

import blake3
import pytest

from dptrain.coordinator.api import hashed_io
from dptrain.coordinator.api.hashed_io import hash_file, write_at, write_hashed

DATA = os.urandom(5 * 1024 * 1024 + 123)


def _chunks(data, size=1 << 20):
    return [data[i:i + size] for i in range(0, len(data), size)]


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "dptrain-writer"]


@pytest.mark.parametrize("algorithm, reference", [("blake3", blake3.blake3),
                                                   ("sha256", hashlib.sha256)])
def test_writes_the_bytes_and_returns_their_digest(tmp_path, algorithm, reference):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        assert write_hashed(_chunks(DATA), f, algorithm) == (reference(DATA).hexdigest(),
                                                             len(DATA))
    assert path.read_bytes() == DATA
    with open(tmp_path / "empty", "wb") as f:
        assert write_hashed([], f, algorithm) == (reference(b"").hexdigest(), 0)
    assert (tmp_path / "empty").read_bytes() == b""
    assert _writer_threads() == []


def test_an_unknown_algorithm_is_refused_before_anything_is_written(tmp_path):
    with open(tmp_path / "f", "wb") as f, pytest.raises(ValueError, match="unknown hash .*md5"):
        write_hashed(_chunks(DATA), f, "md5")
    assert (tmp_path / "f").read_bytes() == b"" and _writer_threads() == []


def test_a_reused_buffer_is_written_as_it_was_when_yielded(tmp_path):
    def reusing():
        buffer = bytearray(4)
        for i in range(1000):
            buffer[:] = i.to_bytes(4, "little")
            yield buffer  # the next iteration overwrites it
            yield memoryview(buffer)[:2]

    expected = b"".join(i.to_bytes(4, "little") + i.to_bytes(4, "little")[:2]
                        for i in range(1000))
    with open(tmp_path / "f", "wb") as f:
        assert write_hashed(reusing(), f, "blake3") == (blake3.blake3(expected).hexdigest(),
                                                         6000)
    assert (tmp_path / "f").read_bytes() == expected


def test_fsync_comes_after_the_last_byte_and_write_back_starts_early(tmp_path, monkeypatch):
    path = tmp_path / "f"
    synced_sizes, early = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(hashed_io, "SYNC_BYTES", 1 << 20)
    monkeypatch.setattr(hashed_io, "_start_write_back",
                        lambda fd: early.append(os.fstat(fd).st_size))

    def fsync(fd):
        synced_sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(hashed_io.os, "fsync", fsync)
    with open(path, "wb") as f:
        write_hashed(_chunks(DATA), f, "blake3")
    assert synced_sizes == [len(DATA)]
    assert early == [(i + 1) << 20 for i in range(5)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_on_linux_write_back_starts_without_waiting_through_sync_file_range(tmp_path):
    start = hashed_io._write_back_starter()
    assert start not in (getattr(os, "fdatasync", None), os.fsync)
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(DATA)
        f.flush()
        assert start(f.fileno()) is None
    assert path.read_bytes() == DATA
    start(-1)  # a hint: even a bad descriptor raises nothing (the final fsync would)


def test_a_broken_stream_raises_its_own_error_and_stops_the_writer(tmp_path):
    def broken():
        yield from _chunks(DATA)[:3]
        raise ConnectionError("the peer went away")

    with open(tmp_path / "f", "wb") as f, pytest.raises(ConnectionError, match="went away"):
        write_hashed(broken(), f, "blake3")
    assert _writer_threads() == []


def test_a_failing_write_is_raised_in_the_callers_thread(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with open(tmp_path / "f", "rb") as f, pytest.raises(OSError):  # not open for writing
        write_hashed(_chunks(DATA), f, "blake3")
    assert _writer_threads() == []


def test_chunks_must_be_bytes_like(tmp_path):
    with open(tmp_path / "f", "wb") as f, pytest.raises(TypeError, match="got str"):
        write_hashed([b"ok", "text"], f, "blake3")
    assert _writer_threads() == []


# ------------------------------------------------------------ write_at, hash_file (ranges)

@pytest.mark.parametrize("algorithm, reference", [("blake3", blake3.blake3),
                                                   ("sha256", hashlib.sha256)])
@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, 5 * (1 << 20) + 123])
def test_a_whole_file_hashes_as_the_reference_does(tmp_path, algorithm, reference, size):
    (tmp_path / "f").write_bytes(DATA[:size])
    assert hash_file(tmp_path / "f", algorithm) == reference(DATA[:size]).hexdigest()


def test_ranges_written_at_their_offsets_from_threads_make_the_file(tmp_path):
    ranges = [(0, 1 << 20), (1 << 20, 3 * (1 << 20) + 7), (3 * (1 << 20) + 7, len(DATA))]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    positions = [[a] for a, _ in ranges]
    counted = []
    threads = [threading.Thread(target=write_at, args=(
        fd, _chunks(DATA[a:b]), position, b, counted.append))
        for (a, b), position in zip(reversed(ranges), reversed(positions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == DATA
    assert positions == [[b] for _, b in ranges] and sum(counted) == len(DATA)


def test_a_chunk_past_the_ranges_end_is_refused_and_not_written(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    position = [0]
    with pytest.raises(ValueError, match="^1 more bytes than asked for$"):
        write_at(fd, [b"abc", b"defg"], position, 6)
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"abc" and position == [3]
