"""An uploaded checkpoint's header, checked against its manifest before any byte is stored:
by `checkpoint_store.store_checkpoint`, and by OpenCheckpointUpload before a ticket for the
data port is issued (`checkpoint_store.check_worker_upload`)."""

from __future__ import annotations

import re
import sys
from typing import Any

from dptrain.coordinator.api.checkpoint_upload import CheckpointUpload
from dptrain.coordinator.api.errors import BlobTooLarge, ValidationError
from dptrain.coordinator.api.limits import (
    MAX_CHECKPOINT_FILES,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
)
from dptrain.coordinator.api.strict_json import loads
from dptrain.coordinator.server.blobs import blob_id
from dptrain.worker.checkpoint_manifest import MANIFEST

__all__ = ["check_upload_header"]

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_DOUBLE = sys.float_info.max


def check_upload_header(upload: CheckpointUpload, max_size: int | None) -> dict[str, Any]:
    """Validate an upload's header against its manifest (before any byte is stored).

    Args:
        upload: the header.
        max_size: the largest file the blob store takes (None: any).

    Returns:
        The parsed manifest.

    Raises:
        ValidationError: naming the field of the header or manifest at fault.
        BlobTooLarge: a file over `max_size`.
    """
    if isinstance(upload.step, bool) or not isinstance(upload.step, int) or upload.step < 0:
        raise ValidationError("header.step", "must be an integer >= 0", upload.step)
    if len(upload.manifest_json) > MAX_MANIFEST_BYTES:
        raise ValidationError("header.manifest_json", f"must be at most {MAX_MANIFEST_BYTES} "
                              "bytes", f"{len(upload.manifest_json)} bytes")
    # The worker writes NaN for a metric that diverged; the API carries it as a double.
    manifest = loads(upload.manifest_json, "header.manifest_json", max_depth=MAX_MANIFEST_DEPTH,
                     allow_nan=True)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValidationError("header.manifest_json", "must be an object with 'files'",
                              type(manifest).__name__)
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step != upload.step:
        raise ValidationError("header.step", f"must equal the manifest's step ({step!r})",
                              upload.step)
    _check_manifest_summary(manifest)
    if len(upload.files) > MAX_CHECKPOINT_FILES:
        raise ValidationError("header.files", f"at most {MAX_CHECKPOINT_FILES} files",
                              len(upload.files))
    names = [f.name for f in upload.files]
    if len(set(names)) != len(names):
        raise ValidationError("header.files", "file names must be unique", names)
    for i, f in enumerate(upload.files):
        where = f"header.files[{i}]"
        if not _FILE_NAME.fullmatch(f.name) or f.name == MANIFEST:
            raise ValidationError(f"{where}.name", "must be a plain file name (letters, digits, "
                                  "'.', '_', '-'), not manifest.json", f.name)
        blob_id(f.algorithm, f.digest, f"{where}.{f.algorithm}")
        if f.size < 0:
            raise ValidationError(f"{where}.size", "must be >= 0", f.size)
        if max_size is not None and f.size > max_size:
            raise BlobTooLarge(max_size)
        listed = manifest["files"].get(f.name)
        if listed != f.manifest_entry():
            raise ValidationError(f"{where}", "must match the manifest's entry for the file",
                                  listed)
    missing = sorted(set(manifest["files"]) - set(names))
    if missing:
        raise ValidationError("header.files", "must list every file of the manifest; missing",
                              missing)
    return manifest


def _check_manifest_summary(manifest: dict[str, Any]) -> None:
    """Refuse an epoch or metrics that a ``Checkpoint`` message could not carry (a listing of
    the job's checkpoints would fail on them for good)."""
    epoch = manifest.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)
                              or not 0 <= epoch < 2**63):
        raise ValidationError("header.manifest_json.epoch", "must be an integer in 0..2**63-1",
                              epoch)
    metrics = manifest.get("metrics")
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise ValidationError("header.manifest_json.metrics", "must be an object of metric "
                              "names to values", type(metrics).__name__)
    for name, value in metrics.items():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_DOUBLE:
            raise ValidationError(f"header.manifest_json.metrics.{name}", "must be a number "
                                  "within a double's range", value)
