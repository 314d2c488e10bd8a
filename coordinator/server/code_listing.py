"""The listing of a stored code archive: the names of its files, kept beside the archive.

A submission that names shipped code is checked against the archive's file names
(``worker.module_policy``). Reading them from the archive means hashing it (the blob store
verifies what it hands out) and decompressing all of it, at every submission; an archive is
content-addressed, so its listing never changes. The upload that stored and checked the archive
(`code_store.receive_code`) writes the listing once, atomically, as ``<sha256>.json`` in the
state directory's ``code-listings``:

    {"archive": "sha256:<digest>", "files": [...], "files_sha256": "<sha256 of the files>"}

A listing is used only when it names the archive asked for and its files hash as recorded; one
missing (an archive uploaded by an older version) or damaged is made again from the archive,
verified, as before. A damaged archive is still refused where its bytes are used: its job's
workers hash what they fetch (DATA_LOSS).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.private_files import write_private
from dptrain.worker.code_archive import check_archive

__all__ = ["LISTING_DIR", "archive_files", "write_listing", "drop_stale_listings"]

log = logging.getLogger("dptrain.coordinator")

LISTING_DIR = "code-listings"
"""The listings' directory in the state directory."""


def _files_sha256(files: list[str]) -> str:
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


def write_listing(directory: Path | None, digest: str, files: list[str]) -> None:
    """Keep the file names of archive `digest` (checked: ``check_archive``'s answer).

    Args:
        directory: the listings' directory; None keeps nothing.
        digest: the archive's sha256.
        files: its file names.
    """
    if directory is None:
        return
    try:
        write_private(directory / f"{digest}.json", json.dumps(
            {"archive": f"sha256:{digest}", "files": files,
             "files_sha256": _files_sha256(files)}))
    except OSError as e:  # a full disk, say: the next submission reads the archive instead
        log.warning("the listing of code archive sha256:%s was not kept: %s", digest, e)


def _kept(directory: Path, digest: str) -> list[str] | None:
    try:
        data = json.loads((directory / f"{digest}.json").read_text("utf-8"))
        files = data["files"]
        if (data["archive"] == f"sha256:{digest}" and isinstance(files, list)
                and all(isinstance(f, str) for f in files)
                and data["files_sha256"] == _files_sha256(files)):
            return files
    except (OSError, ValueError, TypeError, KeyError):  # missing, cut short or changed
        pass
    return None


def archive_files(directory: Path | None, blobs: BlobStore, digest: str,
                  limit: int) -> list[str]:
    """The names of the files in the stored archive `digest`: its kept listing, or else the
    archive read (verified) and checked, and its listing kept for the next time.

    Args:
        directory: the listings' directory; None: always read the archive.
        blobs: the blob store holding the archive.
        digest: the archive's sha256.
        limit: the most bytes its files may hold unpacked (``check_archive``).

    Raises:
        BlobNotFound, BlobCorrupted: no such archive, or a damaged one (reading it).
        CodeArchiveError: an archive ``check_archive`` refuses.
    """
    if directory is not None and (files := _kept(directory, digest)) is not None:
        return files
    files = check_archive(blobs.get(digest), limit)
    if directory is not None and os.path.isdir(directory):
        write_listing(directory, digest, files)
    return files


def drop_stale_listings(directory: Path | None, blobs: BlobStore, *,
                        min_age: float = 0.0) -> list[str]:
    """Remove the listings whose archive the blob store no longer holds (freed with the last
    job naming it), sparing any younger than `min_age` seconds.

    A listing is written after its archive is stored, so one without an archive is a freed
    archive's; an archive uploaded again gets its listing again.

    Returns:
        The digests whose listings were removed.
    """
    if directory is None or not directory.is_dir():
        return []
    cutoff = time.time() - min_age
    removed = []
    for path in directory.glob("*.json"):
        digest = path.stem
        try:
            if not blobs.exists(digest) and path.stat().st_mtime <= cutoff:
                path.unlink()
                removed.append(digest)
        except FileNotFoundError:  # removed meanwhile
            pass
    return removed
