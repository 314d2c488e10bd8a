"""Imports flow one way: the worker never imports the coordinator, and what rank 0 and the
coordinator load to talk about a job stays light (no engine, no server for a worker)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fresh_imports import modules_loaded_by
from import_scan import imported_modules

REPO = Path(__file__).resolve().parents[1]


def test_the_scan_sees_imports_inside_functions_and_relative_ones():
    source = ("def f():\n    from dptrain.coordinator import client\n"
              "    from .. import coordinator\n")
    found = imported_modules(source, "dptrain.worker")
    assert (2, "dptrain.coordinator") in found
    assert (3, "dptrain.coordinator") in found


def test_worker_modules_never_import_the_coordinator():
    offenders = [f"{path.relative_to(REPO)}:{line}: {name}"
                 for path in sorted((REPO / "worker").rglob("*.py"))
                 for line, name in imported_modules(
                     path.read_text(), ".".join(["dptrain", *path.relative_to(REPO).parent.parts]))
                 if name == "dptrain.coordinator" or name.startswith("dptrain.coordinator.")]
    assert offenders == []


@pytest.mark.parametrize("owner,owned", [
    ("engine/backend.py", ("cupy", "cupyx", "dptrain.engine.strict_array")),
    ("engine/cpu_kernels.py", ("numba", "llvmlite")),
], ids=["cupy-and-the-strict-device", "numba"])
def test_cupy_the_strict_device_and_numba_each_have_one_importer(owner, owned):
    offenders = [f"{path.relative_to(REPO)}:{line}: {name}"
                 for folder in ("engine", "worker", "coordinator")
                 for path in sorted((REPO / folder).rglob("*.py"))
                 if path.relative_to(REPO).as_posix() != owner
                 for line, name in imported_modules(
                     path.read_text(), ".".join(["dptrain", *path.relative_to(REPO).parent.parts]))
                 if any(name == o or name.startswith(o + ".") for o in owned)]
    assert offenders == []


def test_rank_0s_reporter_loads_neither_the_engine_nor_the_checkpoint_server():
    loaded = modules_loaded_by("import dptrain.coordinator.client.worker_reporter")
    assert "dptrain.coordinator.client.worker_reporter" in loaded
    assert sorted(m for m in loaded if m.startswith("dptrain.engine")) == []
    checkpoint_server = {"dptrain.coordinator.server.checkpoint_store",
                         "dptrain.coordinator.server.ingest", "dptrain.coordinator.server.runner",
                         "dptrain.coordinator.server.server", "dptrain.coordinator.server.service"}
    assert sorted(loaded & checkpoint_server) == []


def test_rank_0s_reporter_loads_no_server_module():
    loaded = modules_loaded_by("import dptrain.coordinator.client.worker_reporter")
    assert sorted(m for m in loaded if m.startswith("dptrain.coordinator.server")) == []


@pytest.mark.parametrize("module", [
    "dptrain.worker.environment", "dptrain.worker.exit_codes",
    "dptrain.worker.checkpoint_manifest", "dptrain.atomic_files",
    "dptrain.coordinator.server.blobs", "dptrain.coordinator.server.runner",
])
def test_shared_light_modules_load_no_engine(module):
    loaded = modules_loaded_by(f"import {module}")
    assert module in loaded
    assert sorted(m for m in loaded if m.startswith("dptrain.engine")) == []
