"""Regenerate the checked-in gRPC Python code from ``protos/dptrain/v1/*.proto``.

The one way the generated files are made (``make protos`` runs this; the test
``tests/protos/test_protos_fresh.py`` runs `generate` into a temporary directory and fails
when the checked-in files differ)::

    python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \\
        --grpc_python_out=protos protos/dptrain/v1/coordinator.proto

followed by one fix: protoc writes ``from dptrain.v1 import coordinator_pb2`` into the
``_pb2_grpc`` module, an import that works only with ``protos/`` on ``sys.path``. It becomes
the relative ``from . import coordinator_pb2``, so the code imports as
``protos.dptrain.v1.coordinator_pb2_grpc`` from wherever the package lives. Generating with
``-Iprotos`` (rather than ``-I.``) keeps the file's name inside the descriptor
``dptrain/v1/coordinator.proto``, the path other languages and server reflection see.

Run it with the virtual environment's interpreter, whose grpcio-tools version decides the
generated code's runtime checks (grpcio-tools 1.85.1: grpcio >= 1.85.1, protobuf >= 7.35.1;
the floors in pyproject.toml must not be older).

Usage: ``python scripts/gen_protos.py [OUT_DIR]`` (default: ``protos/``, in place).
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTO_FILES = ("dptrain/v1/coordinator.proto",)
_ABSOLUTE_IMPORT = re.compile(r"^from dptrain\.v1 import (\w+_pb2) as ", re.MULTILINE)


def generated_files(out_dir: Path) -> list[Path]:
    """The files `generate` writes for every proto, under `out_dir`.

    Args:
        out_dir: the output root (``protos/`` for the checked-in copy).

    Returns:
        The paths of the ``_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py`` files.
    """
    out = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        out += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi",
                out_dir / f"{stem}_pb2_grpc.py"]
    return out


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) over `PROTO_FILES` and fix the imports.

    Args:
        out_dir: where to write (``out_dir/dptrain/v1/...``); created when missing.

    Returns:
        The generated files.

    Raises:
        RuntimeError: protoc failed (its message is on stderr).
    """
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    for proto in PROTO_FILES:
        (out_dir / proto).parent.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(str(PROTO_ROOT / proto) for proto in PROTO_FILES)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    files = generated_files(out_dir)
    for path in files:
        text = path.read_text(encoding="utf-8")
        fixed = _ABSOLUTE_IMPORT.sub(r"from . import \1 as ", text)
        if fixed != text:
            path.write_text(fixed, encoding="utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    """Regenerate into ``argv[0]`` (default: ``protos/``) and list the files written.

    Args:
        argv: the command-line arguments after the script's name.

    Returns:
        The exit code.
    """
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else PROTO_ROOT
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
