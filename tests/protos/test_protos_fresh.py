"""The checked-in generated gRPC code is exactly what ``make protos`` makes from the .proto
today, and it demands no newer runtime than pyproject.toml's floors allow."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from repo import REPO

SCRIPT = REPO / "scripts" / "gen_protos.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_protos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _floor(package: str) -> tuple[int, ...]:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}>=([0-9.]+)"', text)
    assert match, f"pyproject.toml declares no floor for {package}"
    return _version(match.group(1))


def test_generated_code_is_fresh(tmp_path):
    gen = _load_script()
    fresh = gen.generate(tmp_path)
    checked_in = gen.generated_files(gen.PROTO_ROOT)
    assert [p.relative_to(tmp_path) for p in fresh] == [
        p.relative_to(gen.PROTO_ROOT) for p in checked_in]
    stale = [str(p.relative_to(REPO)) for new, p in zip(fresh, checked_in)
             if not p.exists() or p.read_bytes() != new.read_bytes()]
    assert not stale, f"stale generated code, run `make protos`: {', '.join(stale)}"


def test_generated_code_imports_by_its_package_path():
    # In a fresh interpreter, without protos/ on sys.path: the grpc module must find its
    # messages through the package, not through a top-level `dptrain.v1` module.
    code = ("import sys\n"
            "from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb\n"
            "from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as g\n"
            "assert g.dptrain_dot_v1_dot_coordinator__pb2 is pb\n"
            "assert 'dptrain.v1' not in sys.modules\n"
            "print(pb.DESCRIPTOR.name, pb.DESCRIPTOR.package)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dptrain/v1/coordinator.proto", "dptrain.v1"]


def test_generated_code_needs_no_newer_runtime_than_the_floors():
    pb2 = (REPO / "protos/dptrain/v1/coordinator_pb2.py").read_text()
    grpc_gen = (REPO / "protos/dptrain/v1/coordinator_pb2_grpc.py").read_text()
    protobuf_made = re.search(r"# Protobuf Python Version: ([0-9.]+)", pb2).group(1)
    grpc_made = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_gen).group(1)
    assert _version(protobuf_made) <= _floor("protobuf"), (
        f"the generated code checks for protobuf >= {protobuf_made}; raise the floor in "
        f"pyproject.toml or generate with an older grpcio-tools")
    assert _version(grpc_made) <= _floor("grpcio")


@pytest.mark.parametrize("name", ["grpcio-health-checking", "grpcio-reflection"])
def test_grpc_companions_match_the_grpcio_floor(name):
    assert _floor(name) == _floor("grpcio")


def test_every_rpc_and_field_has_a_comment():
    lines = (REPO / "protos/dptrain/v1/coordinator.proto").read_text().splitlines()
    declaration = re.compile(r"^\s*(rpc |(optional |repeated )?[\w.<>, ]+ \w+ = \d+;"
                             r"|message |service |enum |\w+ = \d+;)")
    declared = [i for i, line in enumerate(lines) if declaration.match(line)]
    assert len(declared) > 150  # the pattern does find the rpcs, messages and fields
    missing = [f"{i + 1}: {lines[i].strip()}" for i in declared
               if not lines[i - 1].strip().startswith("//")]
    assert not missing, "uncommented declarations:\n" + "\n".join(missing)
