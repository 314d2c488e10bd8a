"""Shared by the MPI test scripts: gather each rank's results and print them on rank 0."""

from __future__ import annotations

import hashlib
import json

import numpy as np


def report(comm, result: dict) -> None:
    """Gather `result` from every rank; rank 0 prints ``{"size": n, "ranks": [...]}`` as one
    JSON line, which the test parses."""
    gathered = comm.allgather_object(result)
    if comm.rank == 0:
        print(json.dumps({"size": comm.size, "ranks": gathered}), flush=True)


def params_hash(module) -> str:
    """A digest of every parameter's bytes, to check ranks are bit-identical."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(np.ascontiguousarray(p.numpy()).tobytes())
    return h.hexdigest()


def grads_hash(module) -> str:
    """A digest of every gradient's bytes (None hashes as the word)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(b"None" if p.grad is None else np.ascontiguousarray(p.grad.numpy()).tobytes())
    return h.hexdigest()


def error_of(fn) -> list | None:
    """``[exception type name, message]`` of what ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return [type(e).__name__, str(e)]
    return None
