"""The checkpoint directory format, defined once: its name, its manifest, and verifying it.

A checkpoint is a directory named after its step, under a job's checkpoint directory::

    CHECKPOINT_DIR/
      step-00000200/
        model.safetensors       the model's state_dict
        optimizer.safetensors   the optimizer's state arrays
        manifest.json           written last: the checkpoint's fields, and a digest per file

``manifest.json`` is a JSON object holding ``format_version``, ``step`` and
``files: {name: {"blake3": hex digest, "bytes": size}}`` for every other file of the directory,
besides what ``worker.checkpoint`` records (epoch, RNG states, the spec, metrics ...). The
manifest is written last and atomically, so a checkpoint exists only once it is complete.

Each file entry names its hash algorithm by its key: ``"blake3"`` in what this version writes
(BLAKE3 hashes a file about 3.5 times faster than sha256 here, and every transfer hashes it on
both ends), ``"sha256"`` in checkpoints written before, which keep loading and verifying
(`HASH_ALGORITHMS`). Both are 64 lowercase hex digits.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import blake3

from dptrain.atomic_files import write_atomically

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "OPTIMIZER_FILE", "HASH_ALGORITHMS",
    "DEFAULT_HASH", "CheckpointError", "FileEntry", "Hasher", "new_hasher", "check_digest",
    "checkpoint_name", "list_checkpoints", "hash_file", "write_manifest", "parse_manifest",
    "read_manifest", "manifest_files", "verify_checkpoint",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_HASH_READ_BYTES = 1 << 20  # a read buffer for hashing, not a transfer's chunk size
_DIR_RE = re.compile(r"^step-(\d{8,})$")


class Hasher(Protocol):
    """What `new_hasher` returns: ``hashlib``'s incremental interface."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


HASH_ALGORITHMS: dict[str, Callable[[], Hasher]] = {
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,  # checkpoints written before BLAKE3
}
"""The hash algorithms a manifest entry may name, each a constructor of its incremental
hasher. Both give 64 lowercase hex digits."""

DEFAULT_HASH = "blake3"
"""The algorithm of the manifests this version writes."""

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(Exception):
    """A checkpoint that is incomplete, damaged, or of an unknown format."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint besides its manifest.

    Attributes:
        name: its name in the checkpoint directory.
        size: its size in bytes.
        digest: the hex digest of its bytes.
        algorithm: the hash algorithm of `digest`, a key of `HASH_ALGORITHMS`.
    """

    name: str
    size: int
    digest: str
    algorithm: str

    def manifest_entry(self) -> dict[str, Any]:
        """The entry's form in ``manifest.json``: ``{algorithm: digest, "bytes": size}``."""
        return {self.algorithm: self.digest, "bytes": self.size}


def new_hasher(algorithm: str) -> Hasher:
    """A fresh incremental hasher.

    Args:
        algorithm: a key of `HASH_ALGORITHMS`.

    Raises:
        ValueError: an unknown algorithm.
    """
    try:
        return HASH_ALGORITHMS[algorithm]()
    except KeyError:
        raise ValueError(f"unknown hash algorithm {algorithm!r} (known: "
                         f"{', '.join(HASH_ALGORITHMS)})") from None


def check_digest(algorithm: object, digest: object) -> str | None:
    """Why an ``(algorithm, digest)`` pair is not one a manifest may hold; None if it is.

    Returns:
        The broken rule, e.g. ``"must be 64 lowercase hex digits (a blake3 digest)"``.
    """
    if algorithm not in HASH_ALGORITHMS:
        return f"must name a hash algorithm ({', '.join(HASH_ALGORITHMS)})"
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        return f"must be 64 lowercase hex digits (a {algorithm} digest)"
    return None


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


def hash_file(path: str | os.PathLike, algorithm: str = DEFAULT_HASH) -> str:
    """The hex digest of a file's bytes.

    Args:
        path: the file.
        algorithm: a key of `HASH_ALGORITHMS`.

    Returns:
        64 lowercase hex digits.
    """
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_READ_BYTES):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, fields: Mapping[str, Any],
                   files: Iterable[str], algorithm: str = DEFAULT_HASH) -> dict[str, Any]:
    """Write a checkpoint's ``manifest.json`` last, atomically: the checkpoint now exists.

    Args:
        directory: the checkpoint's directory, holding `files`.
        fields: the manifest's JSON-ready fields (``step`` among them).
        files: the names of the files it covers; each one's digest and size are recorded.
        algorithm: the hash algorithm of the digests (a key of `HASH_ALGORITHMS`).

    Returns:
        The manifest written (``format_version`` and ``files`` added to `fields`).
    """
    directory = os.fspath(directory)
    entries = {}
    for name in files:
        path = os.path.join(directory, name)
        entries[name] = FileEntry(name, os.path.getsize(path), hash_file(path, algorithm),
                                  algorithm).manifest_entry()
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


def _file_entry(name: str, entry: Any) -> FileEntry:
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"manifest.json lists {name!r} wrongly: not an object")
    algorithms = [key for key in entry if key != "bytes"]
    if len(algorithms) != 1 or algorithms[0] not in HASH_ALGORITHMS:
        raise CheckpointError(f"manifest.json lists {name!r} wrongly: it must hold \"bytes\" "
                              f"and one digest ({' or '.join(HASH_ALGORITHMS)}), not "
                              f"{sorted(entry)}")
    size = entry.get("bytes")
    if isinstance(size, bool) or not isinstance(size, int):
        raise CheckpointError(f"manifest.json lists {name!r} wrongly: bytes {size!r}")
    return FileEntry(name, size, str(entry[algorithms[0]]), algorithms[0])


def manifest_files(manifest: Mapping[str, Any]) -> tuple[FileEntry, ...]:
    """The files a parsed manifest lists, sorted by name.

    Args:
        manifest: the parsed ``manifest.json``.

    Returns:
        One `FileEntry` per file, each with the algorithm its entry names.

    Raises:
        CheckpointError: ``files`` is not ``{name: {algorithm: str, "bytes": int}}`` with
            one algorithm of `HASH_ALGORITHMS` per entry.
    """
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, Mapping):
        raise CheckpointError("manifest.json lacks the files it covers")
    return tuple(_file_entry(str(name), entry) for name, entry in sorted(files.items()))


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
    for entry in manifest_files(manifest):
        name = entry.name
        file = os.path.join(path, name)
        if os.path.basename(name) != name or name == MANIFEST:
            raise CheckpointError(f"manifest.json lists {name!r} wrongly")
        if not os.path.isfile(file):
            raise CheckpointError(f"{name} is missing")
        if os.path.getsize(file) != entry.size:
            raise CheckpointError(f"{name} has {os.path.getsize(file)} bytes, the manifest says "
                                  f"{entry.size}")
        digest = hash_file(file, entry.algorithm)
        if digest != entry.digest:
            raise CheckpointError(f"{name} fails its checksum ({entry.algorithm} "
                                  f"{digest[:12]}..., the manifest says {entry.digest[:12]}...)")
    return manifest
