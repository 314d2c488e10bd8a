"""worker.code_archive: what a packed directory holds (ignore files, left-out directories),
the same bytes for the same files, the size limit naming the largest files, and unpacking
that never writes outside its target (hostile archives built by hand with tarfile)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest
from archives import HOSTILE, hostile

from dptrain.worker.code_archive import (
    CodeArchiveError,
    check_archive,
    pack_directory,
    unpack_archive,
)


def tree(root, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


PROJECT = {
    "train.py": "print('hi')\n", "pkg/__init__.py": "", "pkg/model.py": "X = 1\n",
    "pkg/__pycache__/model.cpython-311.pyc": b"\0", ".git/HEAD": "ref\n",
    ".venv/pyvenv.cfg": "home\n", "env2/pyvenv.cfg": "home\n", "env2/lib/x.py": "",
    "data/big.npy": b"\0" * 10, "notes.log": "x", "keep.log": "y",
}


def test_packing_leaves_out_caches_repositories_venvs_and_what_gitignore_names(tmp_path):
    tree(tmp_path, {**PROJECT, ".gitignore": "# data\ndata/\n*.log\n"})
    assert pack_directory(tmp_path).files == (".gitignore", "pkg/__init__.py", "pkg/model.py",
                                              "train.py")


def test_a_dptrainignore_wins_over_the_gitignore(tmp_path):
    tree(tmp_path, {**PROJECT, ".gitignore": "*.py\n", ".dptrainignore": "/data\nnotes.log\n"})
    assert pack_directory(tmp_path).files == (".gitignore", "keep.log", "pkg/__init__.py",
                                              "pkg/model.py", "train.py")


def test_the_same_files_pack_to_the_same_bytes(tmp_path):
    tree(tmp_path / "a", PROJECT)
    tree(tmp_path / "b", PROJECT)
    os.utime(tmp_path / "b" / "train.py", (1, 1))  # times never enter the archive
    a, b = pack_directory(tmp_path / "a"), pack_directory(tmp_path / "b")
    assert hashlib.sha256(a.data).digest() == hashlib.sha256(b.data).digest()


def test_packing_refuses_more_than_the_limit_naming_the_largest_files(tmp_path):
    tree(tmp_path, {"weights.bin": b"\1" * 3000, "small.py": "x = 1\n", "mid.bin": b"\2" * 900})
    with pytest.raises(CodeArchiveError) as info:
        pack_directory(tmp_path, limit=2048)
    message = str(info.value)
    assert message.startswith(f"code directory {tmp_path} is larger than the 2048 bytes limit; "
                              "the largest files: weights.bin (3000 bytes), mid.bin (900 bytes)")
    assert message.index("weights.bin") < message.index("mid.bin") < message.index("small.py")


def test_an_archive_unpacks_to_the_same_files(tmp_path):
    tree(tmp_path / "src", PROJECT)
    archive = tmp_path / "code.tar.gz"
    archive.write_bytes(pack_directory(tmp_path / "src").data)
    target = unpack_archive(archive, tmp_path / "out")
    got = sorted(str(p.relative_to(target)) for p in (tmp_path / "out").rglob("*")
                 if p.is_file())
    assert got == ["data/big.npy", "keep.log", "notes.log", "pkg/__init__.py", "pkg/model.py",
                   "train.py"]
    assert (tmp_path / "out" / "pkg" / "model.py").read_text() == "X = 1\n"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_write_nothing_anywhere(tmp_path, case):
    archive = tmp_path / "in" / "code.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(hostile(HOSTILE[case]))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CodeArchiveError, match="outside the target|not a plain file"):
        unpack_archive(archive, tmp_path / "jobs" / "code" / "x")
    assert sorted(tmp_path.rglob("*")) == before  # not even the target's parent
    assert not (tmp_path / "escaped.py").exists()


def test_not_a_tar_and_too_much_unpacked_are_refused(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not gzip at all")
    with pytest.raises(CodeArchiveError, match="not a gzip-compressed tar"):
        check_archive(junk)
    bomb = tmp_path / "bomb.tar.gz"
    info = tarfile.TarInfo("zeros.bin")
    info.size = 5000
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(info, io.BytesIO(b"\0" * 5000))
    bomb.write_bytes(buffer.getvalue())
    assert len(buffer.getvalue()) < 1000  # small packed, large unpacked
    with pytest.raises(CodeArchiveError, match="unpacks to more than"):
        check_archive(bomb, limit=1000)
