"""Files that appear whole or not at all: the one atomic-write helper of every layer.

A file is written to a temporary name beside its destination, flushed to disk and renamed over
it, then its directory is fsynced: a reader sees the old file or the complete new one, never a
partial write, and the rename survives a power loss.

It lives in the root package, below the engine, the worker and the coordinator alike, because
the root package imports nothing on import (its names load on first use): the coordinator
writes its private files with it without loading the engine, and the engine's safetensors
writer uses it too (the engine may import nothing above itself).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable

__all__ = ["write_atomically", "fsync_directory"]


def write_atomically(path: str | os.PathLike, chunks: Iterable[bytes | bytearray | memoryview],
                     *, mode: int | None = None) -> None:
    """Write `chunks` to a temporary file beside `path`, fsync it, rename it over `path` and
    fsync the directory.

    Args:
        path: the destination.
        chunks: bytes-like objects (a contiguous array's byte view too), written in order.
        mode: the file's permission bits, set whatever the umask (0o600 for a private file);
            None lets the umask decide, as ``open()`` would.

    Raises:
        FileNotFoundError: the directory does not exist.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> write_atomically(path, [b"hello ", b"world"], mode=0o600)
        >>> open(path, "rb").read(), oct(os.stat(path).st_mode & 0o777)
        (b'hello world', '0o600')
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"cannot write, no directory {directory!r}",
                                path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # the umask may have removed bits asked for
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make renames and creations in `directory` durable (a no-op where directories cannot be
    opened).

    Args:
        directory: the directory.
    """
    if os.name == "nt":  # pragma: no cover - Windows cannot open a directory
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
