"""A checkpoint as it travels: the header of an upload or a fetch, and its files' chunks.

Both ends of a transfer use it: rank 0's reporter reads the directory it uploads
(`read_checkpoint_directory`), the runner stores its workers' directories the same way, and
serde turns the header into its proto and back. The directory format itself belongs to
``worker.checkpoint_manifest``; nothing here touches the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.api.records import CheckpointRecord
from dptrain.worker.checkpoint_manifest import (
    MANIFEST,
    CheckpointError,
    FileEntry,
    manifest_files,
    parse_manifest,
)

__all__ = ["FileEntry", "CheckpointUpload", "record_files", "read_checkpoint_directory"]


@dataclass(frozen=True)
class CheckpointUpload:
    """The header of an upload (and of a fetch): which checkpoint, and its files in order.

    Attributes:
        job_id: the job.
        step: the checkpoint's step.
        manifest_json: the bytes of its ``manifest.json``.
        files: every other file, in the order their bytes follow.
    """

    job_id: str
    step: int
    manifest_json: bytes
    files: tuple[FileEntry, ...]


def record_files(record: CheckpointRecord) -> list[FileEntry]:
    """The files of a stored checkpoint besides ``manifest.json``, sorted by name."""
    return list(manifest_files({"files": record.manifest.get("files") or {}}))


def read_checkpoint_directory(job_id: str, path: str | os.PathLike,
                              on_chunk: Callable[[int], None] | None = None
                              ) -> tuple[CheckpointUpload, Iterator[tuple[str, bytes]]]:
    """A checkpoint directory written by ``worker.checkpoint.write_checkpoint``, as an upload.

    What a worker sends and what the runner stores from a job's checkpoint directory alike.

    Args:
        job_id: the job it belongs to.
        path: the directory (``step-XXXXXXXX``).
        on_chunk: called with each chunk's size as it is read (progress).

    Returns:
        ``(header, chunks)``: the header from its ``manifest.json``; ``(file name, bytes)``
        chunks of at most `CHUNK_BYTES`, read lazily, in the header's file order.

    Raises:
        OSError: the manifest cannot be read (from the chunks: a file cannot be read).
        ValueError: the manifest is not a checkpoint's.
    """
    path = Path(path)
    manifest_json = (path / MANIFEST).read_bytes()
    try:
        manifest = parse_manifest(manifest_json)
        files = manifest_files(manifest)
        header = CheckpointUpload(job_id, int(manifest["step"]), manifest_json, files)
    except (CheckpointError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / MANIFEST}: not a checkpoint manifest ({e!r})") from None

    def chunks() -> Iterator[tuple[str, bytes]]:
        for entry in files:
            with open(path / entry.name, "rb") as f:
                while data := f.read(CHUNK_BYTES):
                    if on_chunk is not None:
                        on_chunk(len(data))
                    yield entry.name, data

    return header, chunks()
