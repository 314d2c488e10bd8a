"""The checkpoint manifest's one owner: written, read and verified against hand-written JSON."""

from __future__ import annotations

import hashlib
import json

import pytest

from dptrain.worker.checkpoint_manifest import (
    MANIFEST,
    CheckpointError,
    FileEntry,
    checkpoint_name,
    list_checkpoints,
    manifest_files,
    read_manifest,
    verify_checkpoint,
    write_manifest,
)

MODEL = b"model bytes"
OPTIMIZER = b""
# The digests a reader outside dptrain computes: sha256 of the bytes above.
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _directory(tmp_path, step=5):
    path = tmp_path / checkpoint_name(step)
    path.mkdir()
    (path / "model.safetensors").write_bytes(MODEL)
    (path / "optimizer.safetensors").write_bytes(OPTIMIZER)
    return path


def _hand_written(step=5):
    return {"format_version": 1, "step": step, "epoch": 0, "files": {
        "model.safetensors": {"sha256": MODEL_SHA, "bytes": len(MODEL)},
        "optimizer.safetensors": {"sha256": EMPTY_SHA, "bytes": 0}}}


def test_write_records_every_file_as_a_reader_would_compute_it(tmp_path):
    path = _directory(tmp_path)
    write_manifest(path, {"step": 5, "epoch": 0}, ["model.safetensors", "optimizer.safetensors"])
    assert json.loads((path / MANIFEST).read_text()) == _hand_written()
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_hand_written_manifest_reads_and_verifies(tmp_path):
    path = _directory(tmp_path)
    (path / MANIFEST).write_text(json.dumps(_hand_written()))
    assert read_manifest(path) == _hand_written()
    assert verify_checkpoint(path) == _hand_written()
    assert manifest_files(_hand_written()) == (
        FileEntry("model.safetensors", len(MODEL), MODEL_SHA),
        FileEntry("optimizer.safetensors", 0, EMPTY_SHA))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=2), "format version 2"),
    (lambda m: m["files"].pop("optimizer.safetensors"), "does not list optimizer"),
    (lambda m: m["files"].update({"../x": {"sha256": EMPTY_SHA, "bytes": 0}}),
     "lists '../x' wrongly"),
])
def test_verify_refuses_a_wrong_manifest(tmp_path, edit, message):
    path = _directory(tmp_path)
    manifest = _hand_written()
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / MANIFEST).unlink(), "no manifest.json"),
    (lambda p: (p / MANIFEST).write_text("{not json"), "unreadable"),
    (lambda p: (p / MANIFEST).write_text("[]"), "lacks the files"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda p: (p / "model.safetensors").write_bytes(MODEL + b"!"), "has 12 bytes"),
    (lambda p: (p / "model.safetensors").write_bytes(MODEL.upper()), "fails its checksum"),
])
def test_verify_refuses_a_damaged_directory(tmp_path, damage, message):
    path = _directory(tmp_path)
    (path / MANIFEST).write_text(json.dumps(_hand_written()))
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


def test_manifest_files_refuses_a_wrong_layout():
    with pytest.raises(CheckpointError, match="lists its files wrongly"):
        manifest_files({"files": {"model.safetensors": {"sha256": MODEL_SHA}}})


def test_checkpoint_directories_sort_by_step(tmp_path):
    for step in (20, 3, 100):
        _directory(tmp_path, step)
    (tmp_path / "step-12").mkdir()  # not eight digits: not a checkpoint
    (tmp_path / "notes.txt").write_text("")
    assert list_checkpoints(tmp_path) == [
        (3, str(tmp_path / "step-00000003")), (20, str(tmp_path / "step-00000020")),
        (100, str(tmp_path / "step-00000100"))]
    assert list_checkpoints(tmp_path / "missing") == []
