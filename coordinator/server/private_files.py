"""The coordinator's state directory is private to its user, whatever the umask.

It holds job specs, logs, checkpoints and the database of all of them, so every directory the
coordinator creates in it is 0700 and every file 0600: `make_private_dir` and `open_private`
here, `write_private` for files renamed into place, and `PRIVATE_UMASK` for
the worker processes, which write checkpoints and fetch them into the job's directory. SQLite
gives a database's ``-wal`` and ``-shm`` files the database file's own mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dptrain.atomic_files import write_atomically

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "PRIVATE_UMASK", "make_private_dir",
           "open_private", "write_private"]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: The umask the coordinator starts workers with: what they create is private too.
PRIVATE_UMASK = 0o077


def make_private_dir(path: str | os.PathLike) -> Path:
    """Create a directory and its missing parents, each with mode 0700 (set explicitly, as a
    umask may remove bits from what ``mkdir`` asks for). Directories that exist are left as
    they are: an existing state directory is the operator's choice.

    Args:
        path: the directory.

    Returns:
        It, as a `Path`.

    Raises:
        OSError: it cannot be created (or exists and is not a directory).
    """
    path = Path(path)
    missing = []
    parent = path
    while not parent.is_dir():
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made by another thread or process meanwhile: theirs to set
        os.chmod(directory, PRIVATE_DIR_MODE)
    return path


def open_private(path: str | os.PathLike, flags: int) -> int:
    """``os.open`` a file of the coordinator's own, creating it if missing, with mode 0600;
    a file an earlier version left readable by others is made 0600 too.

    Args:
        path: the file.
        flags: ``os.O_*`` flags besides ``O_CREAT`` (added here), e.g.
            ``os.O_WRONLY | os.O_APPEND``.

    Returns:
        The open file descriptor (``os.fdopen`` it).

    Example::

        with os.fdopen(open_private(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log:
            log.write(b"...")
    """
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str | os.PathLike, text: str) -> None:
    """Write a small text file of the coordinator's own atomically, with mode 0600
    (``dptrain.atomic_files.write_atomically``).

    Args:
        path: the file.
        text: its content (UTF-8).
    """
    write_atomically(path, [text.encode("utf-8")], mode=PRIVATE_FILE_MODE)
