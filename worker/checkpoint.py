"""Checkpoints that lose nothing: write, verify, read (falling back past damage) and prune.

One directory per checkpoint, named after its step, under the job's checkpoint directory::

    CHECKPOINT_DIR/
      step-00000200/
        model.safetensors       the model's state_dict (parameters and buffers)
        optimizer.safetensors   the optimizer's state arrays, keyed "state.<param>.<name>"
        manifest.json           written last: everything else, and a sha256 per file

``manifest.json`` holds the format version, the step, the epoch and the position inside it,
every RNG state (the engine generator of every rank; the data order is a pure function of
(seed, epoch), recorded too), the job spec and its hash, the optimizer's scalars and parameter
groups, the scheduler's state, the latest metrics, and ``files: {name: {sha256, bytes}}``.

Every file is written atomically (temporary file, fsync, rename, directory fsync, by
``dptrain.atomic_files``), and the manifest goes last, so a checkpoint exists only once it is
complete: a crash mid-write leaves a directory without a manifest, which readers skip.
`load_latest` verifies checksums and falls back to the newest intact checkpoint, saying so on
stderr. The directory layout and the manifest (names, ``files``, verifying) belong to
``worker.checkpoint_manifest``, which the coordinator shares; this module adds what the
engine's state means in it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dptrain import engine
from dptrain.atomic_files import fsync_directory
from dptrain.engine.tensor import Tensor
from dptrain.worker.checkpoint_manifest import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    verify_checkpoint,
    write_manifest,
)

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "OPTIMIZER_FILE", "Checkpoint",
    "CheckpointError", "CheckpointDiskFull", "write_checkpoint", "verify_checkpoint",
    "read_checkpoint", "list_checkpoints", "load_latest", "prune_checkpoints", "checkpoint_name",
]


@dataclass
class Checkpoint:
    """A verified checkpoint read back into memory.

    Attributes:
        path: its directory.
        step: the number of optimizer steps taken when it was written.
        manifest: the parsed ``manifest.json``.
        model_state: the model's state_dict (name -> Tensor).
        optimizer_state: the optimizer's state_dict, ready for ``load_state_dict``.
    """

    path: str
    step: int
    manifest: dict[str, Any]
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]


class CheckpointDiskFull(OSError):
    """No space left to write a checkpoint (ENOSPC, or the quota's EDQUOT): its partial
    directory is removed, the checkpoints written before are intact.

    Args:
        step: the checkpoint's step.
        root: the checkpoint directory.
        error: the write's error.
    """

    def __init__(self, step: int, root: str, error: OSError):
        super().__init__(error.errno, f"no space left to write the checkpoint of step {step} "
                                      f"under {root} ({error.strerror}); the checkpoints "
                                      "written before are intact: free space there, then "
                                      "resume")
        self.step, self.root = step, root

    def __str__(self) -> str:
        return self.strerror


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state_dict -> (arrays for safetensors, JSON-ready rest)."""
    arrays: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                arrays[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in state_dict["param_groups"]]
    return arrays, {"param_groups": groups, "scalars": scalars}


def _join_optimizer_state(arrays: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in arrays.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def write_checkpoint(root: str | os.PathLike, step: int, model_state: dict[str, Tensor],
                     optimizer_state: dict[str, Any], info: dict[str, Any]) -> str:
    """Write a checkpoint directory for `step`; it becomes visible when its manifest lands.

    Args:
        root: the job's checkpoint directory (created if missing).
        step: the number of optimizer steps taken.
        model_state: ``model.state_dict()``.
        optimizer_state: ``optimizer.state_dict()`` (Tensors go to safetensors, the rest to
            the manifest).
        info: JSON-ready fields for the manifest (epoch, position, rng, spec, ...).

    Returns:
        The checkpoint's directory.

    Raises:
        CheckpointDiskFull: no space left (its partial directory removed).
    """
    root = os.fspath(root)
    try:
        return _write(root, step, model_state, optimizer_state, info)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A directory without its manifest is no checkpoint: remove it, freeing its space.
        shutil.rmtree(os.path.join(root, checkpoint_name(step)), ignore_errors=True)
        raise CheckpointDiskFull(step, root, e) from None


def _write(root: str, step: int, model_state: dict[str, Tensor],
           optimizer_state: dict[str, Any], info: dict[str, Any]) -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, checkpoint_name(step))
    manifest_path = os.path.join(path, MANIFEST)
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(manifest_path):  # rewriting a step: hide the old one first
        os.unlink(manifest_path)
        fsync_directory(path)
    arrays, rest = _split_optimizer_state(optimizer_state)
    engine.save(model_state, os.path.join(path, MODEL_FILE))
    engine.save(arrays, os.path.join(path, OPTIMIZER_FILE))
    write_manifest(path, {**info, "step": step, "optimizer": rest, "written_at": time.time()},
                   (MODEL_FILE, OPTIMIZER_FILE))
    if created:
        fsync_directory(root)
    return path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Verify a checkpoint and read it into memory.

    Args:
        path: the checkpoint's directory.

    Returns:
        The checkpoint, its Tensors on the host.

    Raises:
        CheckpointError: it is incomplete, damaged or unreadable.
    """
    path = os.fspath(path)
    manifest = verify_checkpoint(path)
    try:
        model_state = engine.load(os.path.join(path, MODEL_FILE))
        arrays = engine.load(os.path.join(path, OPTIMIZER_FILE))
        optimizer_state = _join_optimizer_state(arrays, manifest["optimizer"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable ({e})") from None
    return Checkpoint(path, int(manifest["step"]), manifest, model_state, optimizer_state)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_latest(root: str | os.PathLike, log: Callable[[str], None] = _stderr
                ) -> Checkpoint | None:
    """Read the newest intact checkpoint under `root`, skipping damaged or incomplete ones.

    Every checkpoint skipped is reported through `log` with the reason, and so is the one
    used instead.

    Args:
        root: the job's checkpoint directory.
        log: where the fallback messages go (default: stderr).

    Returns:
        The checkpoint, or None when there is no intact one.
    """
    skipped = False
    for step, path in reversed(list_checkpoints(root)):
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            log(f"checkpoint {path} (step {step}) is unusable: {e}; trying an older one")
            skipped = True
            continue
        if skipped:
            log(f"falling back to checkpoint {path} (step {step}), the newest intact one")
        return ckpt
    if skipped:
        log(f"no intact checkpoint under {os.fspath(root)}")
    return None


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (and anything older than them).

    Args:
        root: the job's checkpoint directory.
        keep: how many complete checkpoints (directories with a manifest) to keep, >= 1.

    Returns:
        The directories deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    found = list_checkpoints(root)
    complete = [step for step, path in found if os.path.isfile(os.path.join(path, MANIFEST))]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    removed = []
    for step, path in found:
        if step < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        fsync_directory(os.fspath(root))
    return removed
