"""``dptrain backup``: a consistent copy of a coordinator's state directory, taken while the
coordinator runs.

What is copied, in this order, into a new directory laid out as a state directory (start a
coordinator on it to restore):

1. ``coordinator.db``, through SQLite's online backup API (`sqlite3.Connection.backup`): one
   read transaction, so the copy is the database as it was at one instant, whatever the
   coordinator writes meanwhile (WAL readers never block the writer, nor it them).
2. ``blobs/``: every checkpoint file and code archive, content-addressed. Every blob the
   database copy refers to is in the copy: a blob is written (and fsynced) before the record
   that names it, so it existed at the snapshot; and blobs are deleted only after their records
   are gone, which for a record in the snapshot can happen after it — so while this step runs
   the backup holds ``blobs/backup.lock`` (`server.blobs.BACKUP_LOCK`) and the coordinator
   skips every deletion (what it skipped is garbage its next collection removes). The copy is
   verified against the snapshot at the end: a referenced blob missing fails the backup.
3. ``token``: the coordinator token, so clients keep working against a restored server.

Not copied: ``jobs/`` (worker logs, the runner's per-attempt files; a job that was running
resumes from its newest checkpoint in the copy), ``runner.lock``, temporary files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dptrain.coordinator.api.credentials import TOKEN_FILE
from dptrain.coordinator.server.blobs import BACKUP_LOCK, BlobStore
from dptrain.coordinator.server.checkpoint_store import referenced_blobs
from dptrain.coordinator.server.private_files import make_private_dir, open_private
from dptrain.coordinator.server.server import BLOB_DIR, DB_FILE
from dptrain.coordinator.server.store import SqliteStore

__all__ = ["BackupError", "BackupSummary", "backup_state"]


class BackupError(RuntimeError):
    """The backup cannot be made (the message says why and what to change)."""


@dataclass(frozen=True)
class BackupSummary:
    """What a backup holds.

    Attributes:
        destination: the new state directory.
        jobs: the jobs in the database copy.
        blobs: the blob files copied.
        bytes: their bytes together, the database's included.
    """

    destination: Path
    jobs: int
    blobs: int
    bytes: int


def backup_state(state_dir: str | os.PathLike, destination: str | os.PathLike) -> BackupSummary:
    """Copy a state directory, consistently, while its coordinator may be running.

    Args:
        state_dir: the coordinator's state directory.
        destination: a directory that does not exist yet (or is empty); created private.

    Returns:
        What was copied.

    Raises:
        BackupError: no database in `state_dir`, a non-empty `destination`, or a blob the
            snapshot refers to missing from the copy.
    """
    source, dest = Path(state_dir), Path(destination)
    if not (source / DB_FILE).is_file():
        raise BackupError(f"{source}: no {DB_FILE} here; give the coordinator's --state-dir")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest}: must be a new or empty directory")
    make_private_dir(dest)
    (source / BLOB_DIR).mkdir(mode=0o700, exist_ok=True)
    lock_fd = os.open(source / BLOB_DIR / BACKUP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # waits for a deletion in progress to finish
        _copy_database(source / DB_FILE, dest / DB_FILE)
        copied, size = _copy_blobs(source / BLOB_DIR, dest / BLOB_DIR)
    finally:
        os.close(lock_fd)
    if (source / TOKEN_FILE).is_file():
        shutil.copy2(source / TOKEN_FILE, dest / TOKEN_FILE)
    with SqliteStore(dest / DB_FILE) as store:
        jobs = len(store.all_jobs())
        blobs = BlobStore(dest / BLOB_DIR)
        missing = sorted(name for name in referenced_blobs(store) if not blobs.exists(name))
    if missing:
        raise BackupError(f"{dest}: {len(missing)} file(s) the database refers to are missing "
                          f"from the copy, e.g. {missing[0]}: is {source} on a file system "
                          f"shared with another coordinator?")
    return BackupSummary(dest, jobs, copied, size + (dest / DB_FILE).stat().st_size)


def _copy_database(source: Path, dest: Path) -> None:
    os.close(open_private(dest, os.O_RDWR))  # 0600 before any byte is in it
    src = sqlite3.connect(source)  # only read: the backup is one read transaction
    try:
        target = sqlite3.connect(dest)
        try:
            src.backup(target)  # all pages in one step: one snapshot
        finally:
            target.close()
    finally:
        src.close()


def _copy_blobs(source: Path, dest: Path) -> tuple[int, int]:
    """Copy every blob (the shard directories), not temporary files or the lock."""
    count = size = 0
    make_private_dir(dest)
    for directory, _, files in os.walk(source):
        relative = Path(directory).relative_to(source)
        if relative.parts[:1] == ("tmp",):
            continue
        make_private_dir(dest / relative)
        for name in files:
            if relative == Path(".") and name == BACKUP_LOCK:
                continue
            # copy2 keeps the modification time, which deletion compares with records' times.
            shutil.copy2(Path(directory) / name, dest / relative / name)
            count += 1
            size += (dest / relative / name).stat().st_size
    return count, size
