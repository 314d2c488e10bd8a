"""A job's code as one archive: packed by the client, checked by the coordinator, unpacked by
the ranks. One owner for the format and its safety rules.

The archive is a gzip-compressed tar of regular files and directories only, packed in sorted
order with fixed times, owners and modes, so the same directory always gives the same bytes
and the same sha256 (its name on the coordinator). Packing leaves out what a
``.dptrainignore`` (or, without one, a ``.gitignore``) at the top names, and always
``__pycache__``, ``.git`` and virtual environments; it refuses more than `MAX_CODE_BYTES`,
naming the largest files. Unpacking never writes outside its target: absolute names, ``..``,
links, devices and anything but files and directories are refused (`check_archive`), and so
is more than the limit once uncompressed.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from dptrain.worker.spec_errors import FieldError, JobSpecError

__all__ = ["MAX_CODE_BYTES", "CodeArchiveError", "PackedCode", "pack_directory",
           "check_archive", "unpack_archive", "ALWAYS_LEFT_OUT"]

MAX_CODE_BYTES = 50 * 2**20
"""The default limit on a job's code: 50 MiB, packed and unpacked alike."""

ALWAYS_LEFT_OUT = ("__pycache__", ".git", ".hg", ".svn", ".venv", "venv", ".mypy_cache",
                   ".pytest_cache", ".ruff_cache", ".dptrainignore")
"""Names never packed, wherever they are (and any directory holding a ``pyvenv.cfg``)."""


class CodeArchiveError(ValueError):
    """An archive that is not a safe code archive, or a directory too large to pack."""


@dataclass(frozen=True)
class PackedCode:
    """A packed directory: the archive's bytes and the files in it (relative names)."""

    data: bytes
    files: tuple[str, ...]


def _ignore_patterns(root: str) -> list[str]:
    for name in (".dptrainignore", ".gitignore"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                return [line.strip() for line in f
                        if line.strip() and not line.lstrip().startswith(("#", "!"))]
    return []


def _ignored(relative: str, is_dir: bool, patterns: list[str]) -> bool:
    """gitignore's common forms: ``name``, ``*.ext``, ``dir/``, ``/anchored``, ``a/b``."""
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern.endswith("/"):
            if not is_dir:
                continue
            pattern = pattern.rstrip("/")
        if pattern.startswith("/") or "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(relative, pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def _files(root: str) -> list[tuple[str, str, int]]:
    """``(relative name, path, size)`` of every file to pack, sorted."""
    patterns = _ignore_patterns(root)
    out = []
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = sorted(
            d for d in dirs if d not in ALWAYS_LEFT_OUT
            and not os.path.islink(os.path.join(directory, d))
            and not os.path.isfile(os.path.join(directory, d, "pyvenv.cfg"))
            and not _ignored(rel_dir + d, True, patterns))
        for name in sorted(files):
            path = os.path.join(directory, name)
            if (name in ALWAYS_LEFT_OUT or name.endswith((".pyc", ".pyo"))
                    or not os.path.isfile(path) or os.path.islink(path)
                    or _ignored(rel_dir + name, False, patterns)):
                continue
            out.append((rel_dir + name, path, os.path.getsize(path)))
    return sorted(out)


def _amount(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _too_large(files: list[tuple[str, str, int]], limit: int, what: str) -> CodeArchiveError:
    largest = sorted(files, key=lambda f: (-f[2], f[0]))[:5]
    listed = ", ".join(f"{name} ({_amount(size)})" for name, _, size in largest)
    return CodeArchiveError(f"{what} is larger than the {_amount(limit)} limit; the largest "
                            f"files: {listed} (leave files out with a .dptrainignore)")


def pack_directory(root: str | os.PathLike, limit: int = MAX_CODE_BYTES) -> PackedCode:
    """Pack a directory of code into an archive, the same bytes for the same files.

    Args:
        root: the directory.
        limit: the most bytes of files (and of archive) allowed.

    Returns:
        The archive and the names packed.

    Raises:
        JobSpecError: naming ``code`` when `root` is not a directory.
        CodeArchiveError: more than `limit` bytes (the message names the largest files).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise JobSpecError([FieldError("code", "must be a directory", root)])
    files = _files(root)
    if sum(size for _, _, size in files) > limit:
        raise _too_large(files, limit, f"code directory {root}")
    buffer = io.BytesIO()
    # mtime 0 in the gzip header and in every member: equal files give equal bytes.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path, size in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
    data = buffer.getvalue()
    if len(data) > limit:
        raise _too_large(files, limit, f"code directory {root} (packed)")
    return PackedCode(data, tuple(name for name, _, _ in files))


def check_archive(path: str | os.PathLike, limit: int = MAX_CODE_BYTES) -> list[str]:
    """Check that an archive is a safe code archive, without writing anything.

    Args:
        path: the archive file.
        limit: the most bytes its files may hold once unpacked.

    Returns:
        The names of its files.

    Raises:
        CodeArchiveError: not a gzip tar, a member that is not a plain file or directory,
            a name that is absolute or climbs out (``..``), or more than `limit` bytes.
    """
    names, total = [], 0
    try:
        with tarfile.open(os.fspath(path), mode="r:gz") as tar:
            for member in tar:
                name = member.name
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts \
                        or not parts or ":" in parts[0] or "\0" in name:
                    raise CodeArchiveError(f"member {name!r} would be written outside the "
                                           "target directory")
                if not (member.isfile() or member.isdir()):
                    raise CodeArchiveError(f"member {name!r} is not a plain file or directory "
                                           "(links and devices are refused)")
                total += member.size
                if total > limit:
                    raise CodeArchiveError(f"the archive unpacks to more than the "
                                           f"{_amount(limit)} limit")
                if member.isfile():
                    names.append(name)
    except (tarfile.TarError, EOFError, OSError, UnicodeError) as e:
        raise CodeArchiveError(f"not a gzip-compressed tar archive ({e})") from None
    return names


def unpack_archive(path: str | os.PathLike, target: str | os.PathLike,
                   limit: int = MAX_CODE_BYTES) -> str:
    """Unpack a checked archive into `target`, which appears complete or not at all.

    Args:
        path: the archive.
        target: the directory to create (an existing one is kept: the same archive's).
        limit: as `check_archive`.

    Returns:
        `target`.

    Raises:
        CodeArchiveError: as `check_archive` (nothing is written then).
    """
    target = os.fspath(target)
    if os.path.isdir(target):
        return target
    check_archive(path, limit)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".unpacking-")
    try:
        with tarfile.open(os.fspath(path), mode="r:gz") as tar:
            for member in tar:
                dest = os.path.join(staging, *PurePosixPath(member.name).parts)
                if member.isdir():
                    os.makedirs(dest, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                source = tar.extractfile(member)
                with open(dest, "wb") as out:
                    shutil.copyfileobj(source, out)
        try:
            os.rename(staging, target)
        except OSError:  # another rank of this host was first: its copy is the same
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
