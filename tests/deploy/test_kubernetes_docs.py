"""The Kubernetes walk-through of docs/deploy.md against the files it feeds: its ``dptrain tls
init`` command is run as written, inside a copy of ``deploy/kubernetes``, and what it writes must
be what the kustomization's Secret, the Deployment's ``serve`` flags and the launcher's
``--tls-secret`` mount read, under the same names."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from jobkit import DPTRAIN
from repo import REPO

from dptrain.coordinator.server.job_files import JobPaths
from dptrain.coordinator.server.launchers.base import WorkerLaunch
from dptrain.coordinator.server.launchers.kubernetes_manifest import (
    KubernetesSettings,
    mpijob_manifest,
)

DEPLOY = REPO / "deploy" / "kubernetes"
SECTION = "## Kubernetes"


def kubernetes_section() -> str:
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text[text.index(f"\n{SECTION}\n"):]
    return section[:section.index("\n## ", len(SECTION) + 2)]


def install_commands() -> list[str]:
    """The shell commands of the section's install block, continuation lines joined."""
    section = kubernetes_section()
    block = section[section.index("**Install**"):].split("```sh\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def serve_flags(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    """deploy/kubernetes with what the docs' ``dptrain tls init`` writes there, as a user
    would have it before ``kubectl apply -k``."""
    directory = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, directory)
    (tls_init,) = [c for c in install_commands() if c.startswith("dptrain tls init ")]
    done = subprocess.run([DPTRAIN, *shlex.split(tls_init)[1:]], cwd=directory,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (directory / "token").write_text("0" * 64 + "\n")
    return directory


def test_the_docs_tls_init_writes_the_files_the_kustomization_makes_its_secret_of(deploy_copy):
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (tls,) = [g for g in kustomization["secretGenerator"] if g["name"] == "dptrain-tls"]
    assert sorted(tls["files"]) == ["tls/ca.pem", "tls/server.key", "tls/server.pem"]
    for name in tls["files"]:
        assert (deploy_copy / name).is_file(), name
    # The files are what their names say: the server's certificate, signed by the CA, for the
    # Service's names the Deployment advertises and for the port-forward's localhost.
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca = x509.load_pem_x509_certificate((deploy_copy / "tls/ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((deploy_copy / "tls/server.pem").read_bytes())
    key = load_pem_private_key((deploy_copy / "tls/server.key").read_bytes(), None)
    server.verify_directly_issued_by(ca)
    assert server.public_key() == key.public_key()
    names = server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    (deployment,) = yaml.safe_load_all((DEPLOY / "deployment.yaml").read_text())
    advertised = serve_flags(deployment)["advertise-address"].replace("$(POD_NAMESPACE)",
                                                                       "dptrain")
    assert {advertised.rsplit(":", 1)[0], "localhost"} <= set(names)
    if (kubectl := shutil.which("kubectl")) is not None:  # as `kubectl apply -k` builds it
        rendered = subprocess.run([kubectl, "kustomize", str(deploy_copy)], capture_output=True,
                                  text=True, check=True).stdout
        (secret,) = [d for d in yaml.safe_load_all(rendered)
                     if d and d["kind"] == "Secret" and d["metadata"]["name"] == "dptrain-tls"]
        assert sorted(secret["data"]) == ["ca.pem", "server.key", "server.pem"]


def test_the_deployment_and_the_launcher_read_the_secret_under_its_names():
    (deployment,) = yaml.safe_load_all((DEPLOY / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName")
                 == "dptrain-tls"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    flags = serve_flags(deployment)
    assert {flag: PurePosixPath(flags[flag]) for flag in ("tls-cert", "tls-key", "tls-ca")} == {
        "tls-cert": PurePosixPath(mount["mountPath"], "server.pem"),
        "tls-key": PurePosixPath(mount["mountPath"], "server.key"),
        "tls-ca": PurePosixPath(mount["mountPath"], "ca.pem")}
    assert flags["tls-secret"] == "dptrain-tls"
    # The workers' pods: the CA under the same key, and nothing else of the Secret.
    settings = KubernetesSettings(image="i:1", tls_secret=flags["tls-secret"])
    launch = WorkerLaunch("j-0123456789ab", 1, "j-0123456789ab.1.ab", (("localhost", 1),),
                          JobPaths(Path("/var/lib/dptrain/jobs/j-0123456789ab")),
                          {"DPTRAIN_TLS_CA": "/etc/dptrain/tls/ca.pem"}, resume=False)
    launcher_pod = mpijob_manifest(settings, launch)["spec"]["mpiReplicaSpecs"]["Launcher"][
        "template"]["spec"]
    (tls_volume,) = [v for v in launcher_pod["volumes"] if "secret" in v]
    assert tls_volume["secret"] == {"secretName": "dptrain-tls",
                                    "items": [{"key": "ca.pem", "path": "ca.pem"}]}
    env = {e["name"]: e.get("value") for e in launcher_pod["containers"][0]["env"]}
    assert env["DPTRAIN_TLS_CA"] == "/etc/dptrain/tls/ca.pem"


def test_the_docs_name_the_files_tls_init_writes(deploy_copy):
    section = kubernetes_section()
    assert "openssl req" not in section  # the certificates come from `dptrain tls init`
    (ca_path,) = re.findall(r"DPTRAIN_TLS_CA=(\S+)", section)
    assert (deploy_copy / Path(ca_path).relative_to("deploy/kubernetes")).is_file()
    (row,) = [line for line in section.splitlines() if line.startswith("| `--tls-secret")]
    assert f"`{KubernetesSettings(image='i').tls_ca_key}`" in row
