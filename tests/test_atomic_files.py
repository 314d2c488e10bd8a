"""The one atomic-write helper: whole files, the mode asked for, nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from dptrain.atomic_files import write_atomically


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_the_chunks_in_order_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    write_atomically(path, [b"ab", bytearray(b"cd"), memoryview(b"ef")])
    assert path.read_bytes() == b"abcdef"
    assert os.listdir(tmp_path) == ["f"]


def test_a_private_file_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        write_atomically(tmp_path / "secret", [b"x"], mode=0o600)
        write_atomically(tmp_path / "plain", [b"x"])
    finally:
        os.umask(old)
    assert _mode(tmp_path / "secret") == 0o600
    assert _mode(tmp_path / "plain") == 0o666  # the umask decides, as open() would


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def chunks():
        yield b"new"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(path, chunks())
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory"):
        write_atomically(tmp_path / "no" / "f", [b"x"])
