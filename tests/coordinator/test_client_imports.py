"""The user's client stays light: importing it loads neither the server's store and logic nor
the engine nor the worker's training code (checked in a fresh interpreter, whose
``sys.modules`` is the independent record of what an import loaded)."""

from __future__ import annotations

import pytest
from fresh_imports import modules_loaded_by, within

#: Prefixes a client process must not load: the coordinator's server side (store, scheduler,
#: metrics, runner), the engine, the worker's training code and MPI, and their numeric stack.
FORBIDDEN = ("dptrain.coordinator.server", "dptrain.engine", "dptrain.worker.train",
             "dptrain.worker.ddp", "dptrain.worker.comm", "dptrain.worker.data",
             "dptrain.worker.checkpoint", "dptrain.worker.sampler", "mpi4py", "numpy",
             "sqlite3")


def _loaded(statement: str) -> list[str]:
    """The forbidden modules a fresh interpreter holds after running the import `statement`."""
    return within(modules_loaded_by(statement), *FORBIDDEN)


@pytest.mark.parametrize("module", [
    "dptrain.coordinator.client", "dptrain.coordinator.client.client",
    "dptrain.coordinator.client.commands", "dptrain.coordinator.client.follow",
    "dptrain.coordinator.api.serde", "dptrain.coordinator.api.credentials",
    "dptrain.coordinator.api.records", "dptrain.coordinator.cli",
])
def test_importing_a_client_module_loads_no_server_engine_or_training_code(module):
    assert _loaded(f"import {module}") == []


def test_the_client_class_loads_no_server_engine_or_training_code():
    # The lazily exported names, as a user writes them.
    assert _loaded("from dptrain.coordinator.client import Client, ClientError") == []
