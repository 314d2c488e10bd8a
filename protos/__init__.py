"""dptrain's gRPC API: .proto sources and their generated Python code.

The ``.proto`` files ship inside the installed package, under `proto_path` (the directory
``dptrain proto-path`` prints), so that a client in another language builds its stubs from the
API the installed coordinator serves: ``protoc -I "$(dptrain proto-path)"
dptrain/v1/coordinator.proto``, or grpcurl ``-import-path "$(dptrain proto-path)" -proto
dptrain/v1/coordinator.proto``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PROTO_FILES", "proto_path"]

PROTO_FILES = ("dptrain/v1/coordinator.proto",)
"""The API's files, relative to `proto_path` (as they are named in their descriptors)."""


def proto_path() -> Path:
    """The directory the API's ``.proto`` files are relative to (``protoc -I``).

    Example:
        >>> (proto_path() / PROTO_FILES[0]).is_file()
        True
    """
    return Path(__file__).resolve().parent
