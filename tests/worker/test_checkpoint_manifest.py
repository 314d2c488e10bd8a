"""The checkpoint manifest's one owner: written, read and verified against hand-written JSON."""

from __future__ import annotations

import hashlib
import json

import blake3
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
# The digests a reader outside dptrain computes: blake3 (what manifests hold now) and sha256
# (what they held before) of the bytes above; the empty inputs' digests are the published ones.
MODEL_B3 = blake3.blake3(MODEL).hexdigest()
EMPTY_B3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
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
        "model.safetensors": {"blake3": MODEL_B3, "bytes": len(MODEL)},
        "optimizer.safetensors": {"blake3": EMPTY_B3, "bytes": 0}}}


def _old_sha256_manifest_text(step=5) -> str:
    """A manifest exactly as dptrain wrote it before BLAKE3: sha256 entries, json.dumps with
    indent=1 and sorted keys, and a final newline."""
    return ('{\n "epoch": 0,\n "files": {\n  "model.safetensors": {\n   "bytes": 11,\n'
            f'   "sha256": "{MODEL_SHA}"\n  }},\n  "optimizer.safetensors": {{\n'
            f'   "bytes": 0,\n   "sha256": "{EMPTY_SHA}"\n  }}\n }},\n'
            f' "format_version": 1,\n "step": {step}\n}}\n')


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
        FileEntry("model.safetensors", len(MODEL), MODEL_B3, "blake3"),
        FileEntry("optimizer.safetensors", 0, EMPTY_B3, "blake3"))


def test_an_old_sha256_manifest_reads_and_verifies_and_catches_a_flipped_byte(tmp_path):
    path = _directory(tmp_path)
    (path / MANIFEST).write_text(_old_sha256_manifest_text())
    manifest = verify_checkpoint(path)
    assert manifest["files"]["model.safetensors"] == {"sha256": MODEL_SHA, "bytes": 11}
    assert manifest_files(manifest) == (
        FileEntry("model.safetensors", len(MODEL), MODEL_SHA, "sha256"),
        FileEntry("optimizer.safetensors", 0, EMPTY_SHA, "sha256"))
    (path / "model.safetensors").write_bytes(b"model bytez")
    with pytest.raises(CheckpointError, match="model.safetensors fails its checksum .sha256"):
        verify_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=2), "format version 2"),
    (lambda m: m["files"].pop("optimizer.safetensors"), "does not list optimizer"),
    (lambda m: m["files"].update({"../x": {"blake3": EMPTY_B3, "bytes": 0}}),
     "lists '../x' wrongly"),
    (lambda m: m["files"]["model.safetensors"].update(sha256=MODEL_SHA),
     "one digest .blake3 or sha256."),
    (lambda m: m["files"]["optimizer.safetensors"].update(md5="d41d8cd98f00b204"),
     "one digest"),
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


@pytest.mark.parametrize("entry, message", [
    ({"sha256": MODEL_SHA}, "bytes None"),
    ({"bytes": 11}, "one digest"),
    ({"bytes": "11", "blake3": MODEL_B3}, "bytes '11'"),
    ([MODEL_B3, 11], "not an object"),
])
def test_manifest_files_refuses_a_wrong_layout(entry, message):
    with pytest.raises(CheckpointError, match=f"lists 'model.safetensors' wrongly.*{message}"):
        manifest_files({"files": {"model.safetensors": entry}})


def test_checkpoint_directories_sort_by_step(tmp_path):
    for step in (20, 3, 100):
        _directory(tmp_path, step)
    (tmp_path / "step-12").mkdir()  # not eight digits: not a checkpoint
    (tmp_path / "notes.txt").write_text("")
    assert list_checkpoints(tmp_path) == [
        (3, str(tmp_path / "step-00000003")), (20, str(tmp_path / "step-00000020")),
        (100, str(tmp_path / "step-00000100"))]
    assert list_checkpoints(tmp_path / "missing") == []
