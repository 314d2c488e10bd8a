"""Every Kubernetes manifest dptrain ships or makes, validated offline (no API server can run
here): the ``deploy/kubernetes`` set, as files and as kustomize renders it, and the MPIJob that
``dptrain render-job`` prints for each example job, with the token Secret the launcher creates
beside it.

Built-in kinds are checked by ``kubernetes-validate`` in strict mode (unknown fields refused),
and a kind it has no schema for is a failure, not the warning its command line gives. MPIJobs are
checked against the MPI Operator's v2beta1 CRD schema vendored in ``deploy/kubernetes/crds``,
made strict the same way, and their pod templates against Kubernetes' own PodTemplate schema.
The last tests feed deliberately broken manifests and see each refused.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from repo import REPO

from dptrain.coordinator.cli import main

REASON = ("the manifest checks need kubernetes-validate and jsonschema "
          "(pip install -e '.[test-deploy]'; CI installs them)")
kv = pytest.importorskip("kubernetes_validate", reason=REASON)
jsonschema = pytest.importorskip("jsonschema", reason=REASON)

K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
DEPLOY = REPO / "deploy" / "kubernetes"
CRD = DEPLOY / "crds" / "kubeflow.org_mpijobs.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
IMAGE = "registry.example.org/dptrain:0.1.0"


# ---------------------------------------------------------------- the validators

def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused wherever it lists the known ones (as the API
    server's strict field validation does), except where it keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _mpijob_validator() -> Any:
    docs = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (crd,) = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


MPIJOB = _mpijob_validator()


def _builtin_problems(manifest: dict[str, Any]) -> list[str]:
    try:
        kv.validate(manifest, K8S_VERSION, strict=True)
    except kv.SchemaNotFoundError as e:  # the command line only warns: here it fails
        return [e.message]
    except kv.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"]
    return []


def problems(manifest: dict[str, Any]) -> list[str]:
    """What is wrong with one manifest ([] when it is valid)."""
    what = f"{manifest.get('kind')} {(manifest.get('metadata') or {}).get('name')}"
    if (manifest.get("apiVersion"), manifest.get("kind")) != ("kubeflow.org/v2beta1", "MPIJob"):
        return [f"{what}: {p}" for p in _builtin_problems(manifest)]
    found = [f"{what}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
             for e in MPIJOB.iter_errors(manifest)]
    for role, replica in ((manifest.get("spec") or {}).get("mpiReplicaSpecs") or {}).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"{role.lower()}"},
                        "template": replica.get("template")}
        found += [f"{what}: {role}: {p}" for p in _builtin_problems(pod_template)]
    return found


# ---------------------------------------------------------------- deploy/kubernetes

def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def _with_secret_files(tmp_path: Path) -> Path:
    """A copy of deploy/kubernetes with the files its secretGenerator reads (which are never
    committed) made up."""
    copy_dir = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, copy_dir)
    for generator in _kustomization().get("secretGenerator", []):
        for name in generator.get("files", []):
            (copy_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (copy_dir / name).write_text(f"made up for the test: {name}\n")
    return copy_dir


def _render_without_kustomize(directory: Path) -> list[dict[str, Any]]:
    """The resources list and the generated Secrets, in the kustomization's namespace: what
    kustomize makes of this kustomization, less the image substitution."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"]
            for d in yaml.safe_load_all((directory / name).read_text()) if d]
    for generator in kustomization.get("secretGenerator", []):
        data = {Path(name).name: base64.b64encode((directory / name).read_bytes()).decode()
                for name in generator["files"]}
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": generator["name"]}, "data": data})
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def renders(tmp_path: Path) -> list[list[dict[str, Any]]]:
    """deploy/kubernetes as ``kubectl apply -k`` would send it: by `_render_without_kustomize`,
    and by ``kubectl kustomize`` too where kubectl is installed."""
    directory = _with_secret_files(tmp_path)
    found = [_render_without_kustomize(directory)]
    if (kubectl := shutil.which("kubectl")) is not None:
        result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        found.append([d for d in yaml.safe_load_all(result.stdout) if d])
    return found


def test_every_manifest_file_is_in_the_kustomization():
    listed = set(_kustomization()["resources"])
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert files == listed


@pytest.mark.parametrize("name", sorted(_kustomization()["resources"]))
def test_each_deploy_manifest_is_valid(name):
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert docs
    for doc in docs:
        assert problems(doc) == []


def test_the_kustomization_renders_a_valid_coordinator(tmp_path):
    for docs in renders(tmp_path):
        assert [problems(d) for d in docs] == [[]] * len(docs)
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
        assert kinds == [
            ("Deployment", "dptrain-coordinator"), ("Namespace", "dptrain"),
            ("PersistentVolumeClaim", "dptrain-state"), ("Role", "dptrain-coordinator"),
            ("RoleBinding", "dptrain-coordinator"), ("Secret", "dptrain-tls"),
            ("Secret", "dptrain-token"), ("Service", "dptrain-coordinator"),
            ("ServiceAccount", "dptrain-coordinator")]
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} \
            == {"dptrain"}


def test_the_kubernetes_validate_command_line_passes_them_too(tmp_path):
    # The same validator as a user runs it: `kubernetes-validate --strict FILE...`. It only
    # warns about a kind it has no schema for, so its output is checked for that too.
    command = shutil.which("kubernetes-validate", path=os.path.dirname(sys.executable))
    assert command is not None  # installed with the kubernetes_validate module
    files = []
    for i, doc in enumerate(renders(tmp_path)[0]):
        files.append(tmp_path / f"{i}-{doc['kind']}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    result = subprocess.run([command, "--strict", "-k", K8S_VERSION, *map(str, files)],
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "couldn't find schema" not in output.lower(), output
    assert output.count(" passed for resource ") == len(files), output


def test_the_coordinators_role_allows_what_the_launcher_calls():
    # the launcher's calls (coordinator/server/launchers/kubernetes.py) and their RBAC verbs
    needed = {("kubeflow.org", "mpijobs", "create"), ("kubeflow.org", "mpijobs", "get"),
              ("kubeflow.org", "mpijobs", "delete"), ("", "secrets", "create"),
              ("", "secrets", "patch"), ("", "secrets", "delete"), ("", "pods", "list")}
    role = yaml.safe_load((DEPLOY / "role.yaml").read_text())
    allowed = {(group, resource, verb) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert needed <= allowed
    assert not any("*" in item for item in allowed)  # nothing beyond what it names


def test_the_deployment_runs_a_command_dptrain_accepts_as_a_non_root_user():
    from dptrain.coordinator.cli import build_parser

    (deployment,) = [d for d in yaml.safe_load_all((DEPLOY / "deployment.yaml").read_text())]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["dptrain", "serve"]
    variables = {"$(POD_NAMESPACE)": "dptrain", "$(WORKER_IMAGE)": IMAGE}  # as Kubernetes does
    argv = []
    for arg in container["args"]:
        for name, value in variables.items():
            arg = arg.replace(name, value)
        argv.append(arg)
    args = build_parser().parse_args(["serve", *argv])
    assert (args.launcher, args.image, args.namespace, args.tls_secret, args.state_dir) == (
        "kubernetes", IMAGE, "dptrain", "dptrain-tls", "/var/lib/dptrain")
    assert args.advertise_address == "dptrain-coordinator.dptrain.svc:50051"  # the Service
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
              for v in pod["volumes"]}
    assert mounts["state"] == args.state_dir and claims["state"] == args.state_claim
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


# ---------------------------------------------------------------- render-job

@pytest.mark.parametrize("job", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_render_job_output_is_a_valid_mpijob(capsys, job):
    code = main(["render-job", str(job), "--launcher", "kubernetes", "--image", IMAGE,
                 "--namespace", "dptrain", "--tls-secret", "dptrain-tls", "--slots-per-worker",
                 "2", "--cpu-per-rank", "1", "--memory-per-rank", "2Gi"])
    out = capsys.readouterr().out
    assert code == 0
    (manifest,) = [d for d in yaml.safe_load_all(out) if d]
    assert manifest["kind"] == "MPIJob"
    assert problems(manifest) == []


def test_the_token_secret_is_a_valid_secret():
    from dptrain.coordinator.server.job_files import JobPaths
    from dptrain.coordinator.server.launchers.base import WorkerLaunch
    from dptrain.coordinator.server.launchers.kubernetes_manifest import (
        KubernetesSettings,
        token_secret_manifest,
    )

    launch = WorkerLaunch("j-0123456789ab", 1, "r", (("pod", 2),),
                          JobPaths(Path("/var/lib/dptrain/jobs/j-0123456789ab")),
                          {"DPTRAIN_JOB_TOKEN": "t0ken"}, resume=False)
    assert problems(token_secret_manifest(KubernetesSettings(image=IMAGE), launch)) == []


# ---------------------------------------------------------------- broken manifests are refused

def _example_mpijob(capsys) -> dict[str, Any]:
    assert main(["render-job", str(EXAMPLES[0]), "--launcher", "kubernetes", "--image",
                 IMAGE]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def _broken(manifest: dict[str, Any], path: str, value: Any, drop: str | None = None
            ) -> dict[str, Any]:
    broken = copy.deepcopy(manifest)
    *parents, last = path.split(".")
    node = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if drop is not None:
        del node[drop]
    else:
        node[last] = value
    return broken


LAUNCHER_CONTAINER = "spec.mpiReplicaSpecs.Launcher.template.spec.containers.0"


@pytest.mark.parametrize(("path", "value", "refusal"), [
    ("spec.mpiImplementation", "MVAPICH", "'MVAPICH' is not one of"),
    ("spec.slotPerWorker", 2, "'slotPerWorker' was unexpected"),
    ("spec.mpiReplicaSpecs.Worker.replicas", "two", "'two' is not of type 'integer'"),
    (f"{LAUNCHER_CONTAINER}.env", {"A": "1"}, "{'A': '1'} is not of type 'array'"),
    (f"{LAUNCHER_CONTAINER}.commands", ["sh"], "'commands' was unexpected"),
])
def test_a_broken_mpijob_is_refused(capsys, path, value, refusal):
    found = problems(_broken(_example_mpijob(capsys), path, value))
    assert any(refusal in p for p in found), found


def test_an_mpijob_without_its_replica_specs_is_refused(capsys):
    found = problems(_broken(_example_mpijob(capsys), "spec.x", None, drop="mpiReplicaSpecs"))
    assert any("'mpiReplicaSpecs' is a required property" in p for p in found), found


@pytest.mark.parametrize(("name", "path", "value", "refusal"), [
    ("deployment.yaml", "spec.replica", 1, "'replica' was unexpected"),
    ("deployment.yaml", "spec.template.spec.containers.0.image", 7, "7 is not of type"),
    ("service.yaml", "spec.ports.0.port", "grpc", "'grpc' is not of type 'integer'"),
    ("role.yaml", "rules.0.verb", ["get"], "'verb' was unexpected"),
])
def test_a_broken_deploy_manifest_is_refused(name, path, value, refusal):
    (doc,) = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    found = problems(_broken(doc, path, value))
    assert any(refusal in p for p in found), found


def test_a_kind_without_a_schema_is_a_failure_not_a_warning():
    widget = {"apiVersion": "example.org/v1", "kind": "Widget", "metadata": {"name": "w"}}
    (problem,) = problems(widget)
    assert problem.startswith("Widget w: Couldn't find schema for kind Widget with api version "
                              "example.org/v1 for kubernetes version 1.30")
