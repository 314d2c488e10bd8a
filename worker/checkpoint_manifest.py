"""The checkpoint directory format, defined once: its name, its manifest, and verifying it.

A checkpoint is a directory named after its step, under a job's checkpoint directory::

    CHECKPOINT_DIR/
      step-00000200/
        model.safetensors       the model's state_dict
        optimizer.safetensors   the optimizer's state arrays
        manifest.json           written last: the checkpoint's fields, and a sha256 per file

``manifest.json`` is a JSON object holding ``format_version``, ``step`` and
``files: {name: {"sha256": hex digest, "bytes": size}}`` for every other file of the directory,
besides what ``worker.checkpoint`` records (epoch, RNG states, the spec, metrics ...). The
manifest is written last and atomically, so a checkpoint exists only once it is complete.

The worker writes and reads checkpoints through this module (``worker.checkpoint``), and so
does the coordinator: rank 0's reporter uploads and fetches them, the server lists a stored
checkpoint's files, the runner stores the directories its workers left. It imports neither the
engine nor the coordinator.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), checkpoint_name(7))
    >>> os.mkdir(path)
    >>> with open(os.path.join(path, MODEL_FILE), "wb") as f:
    ...     _ = f.write(b"weights")
    >>> with open(os.path.join(path, OPTIMIZER_FILE), "wb") as f:
    ...     _ = f.write(b"")
    >>> _ = write_manifest(path, {"step": 7}, [MODEL_FILE, OPTIMIZER_FILE])
    >>> verify_checkpoint(path)["files"][MODEL_FILE]["bytes"]
    7
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dptrain.atomic_files import write_atomically

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "OPTIMIZER_FILE", "CheckpointError",
    "FileEntry", "checkpoint_name", "list_checkpoints", "sha256_file", "write_manifest",
    "parse_manifest", "read_manifest", "manifest_files", "verify_checkpoint",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_HASH_READ_BYTES = 1 << 20  # a read buffer for hashing, not a transfer's chunk size
_DIR_RE = re.compile(r"^step-(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint that is incomplete, damaged, or of an unknown format."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint besides its manifest: its name, size in bytes and sha256."""

    name: str
    size: int
    sha256: str


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at `step` (``step-00000042``).

    Args:
        step: the step number, >= 0.

    Returns:
        The name; names sort in step order.
    """
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """The checkpoint directories under `root`, complete or not, oldest first.

    Args:
        root: the job's checkpoint directory.

    Returns:
        ``(step, path)`` pairs sorted by step; empty when `root` does not exist.
    """
    root = os.fspath(root)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in names
             if (m := _DIR_RE.match(name)) and os.path.isdir(os.path.join(root, name))]
    return sorted(found)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes.

    Args:
        path: the file.

    Returns:
        64 lowercase hex digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_READ_BYTES):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, fields: Mapping[str, Any],
                   files: Iterable[str]) -> dict[str, Any]:
    """Write a checkpoint's ``manifest.json`` last, atomically: the checkpoint now exists.

    Args:
        directory: the checkpoint's directory, holding `files`.
        fields: the manifest's JSON-ready fields (``step`` among them).
        files: the names of the files it covers; each one's sha256 and size are recorded.

    Returns:
        The manifest written (``format_version`` and ``files`` added to `fields`).
    """
    directory = os.fspath(directory)
    entries = {}
    for name in files:
        path = os.path.join(directory, name)
        entries[name] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": entries}
    text = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    write_atomically(os.path.join(directory, MANIFEST), [text])
    return manifest


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Parse the bytes of a ``manifest.json`` (its files are not checked).

    Args:
        raw: the bytes.

    Returns:
        The manifest.

    Raises:
        CheckpointError: it is not JSON, or not an object with ``files``.
    """
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"manifest.json is unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError("manifest.json lacks the files it covers")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and parse a checkpoint's ``manifest.json`` (its files are not checked).

    Args:
        directory: the checkpoint's directory.

    Returns:
        The manifest.

    Raises:
        CheckpointError: there is no manifest, it is unreadable, or it is not an object with
            ``files``.
    """
    try:
        with open(os.path.join(os.fspath(directory), MANIFEST), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError("incomplete: it has no manifest.json") from None
    except OSError as e:
        raise CheckpointError(f"manifest.json is unreadable ({e})") from None
    return parse_manifest(raw)


def manifest_files(manifest: Mapping[str, Any]) -> tuple[FileEntry, ...]:
    """The files a parsed manifest lists, sorted by name.

    Args:
        manifest: the parsed ``manifest.json``.

    Returns:
        One `FileEntry` per file.

    Raises:
        CheckpointError: ``files`` is not ``{name: {"sha256": str, "bytes": int}}``.
    """
    try:
        return tuple(FileEntry(name, int(entry["bytes"]), str(entry["sha256"]))
                     for name, entry in sorted(manifest["files"].items()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"manifest.json lists its files wrongly ({e!r})") from None


def verify_checkpoint(path: str | os.PathLike,
                      required: Iterable[str] = (MODEL_FILE, OPTIMIZER_FILE)) -> dict[str, Any]:
    """Check that a checkpoint directory is complete and undamaged.

    Args:
        path: the checkpoint's directory.
        required: files the manifest must list (a worker checkpoint's model and optimizer).

    Returns:
        Its manifest.

    Raises:
        CheckpointError: why it cannot be used (no manifest, unreadable manifest, unknown
            format version, a file not listed or missing, a size or sha256 mismatch).
    """
    path = os.fspath(path)
    manifest = read_manifest(path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"format version {version!r} is not {FORMAT_VERSION}, the one "
                              f"this version of dptrain reads")
    for name in required:
        if not isinstance(manifest["files"].get(name), dict):
            raise CheckpointError(f"manifest.json does not list {name}")
    for name, entry in manifest["files"].items():
        file = os.path.join(path, name)
        if not isinstance(entry, dict) or os.path.basename(name) != name or name == MANIFEST:
            raise CheckpointError(f"manifest.json lists {name!r} wrongly")
        if not os.path.isfile(file):
            raise CheckpointError(f"{name} is missing")
        if os.path.getsize(file) != entry.get("bytes"):
            raise CheckpointError(f"{name} has {os.path.getsize(file)} bytes, the manifest says "
                                  f"{entry.get('bytes')}")
        digest = sha256_file(file)
        if digest != entry.get("sha256"):
            raise CheckpointError(f"{name} fails its checksum (sha256 {digest[:12]}..., the "
                                  f"manifest says {str(entry.get('sha256'))[:12]}...)")
    return manifest
