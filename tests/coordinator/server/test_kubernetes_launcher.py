"""The kubernetes launcher: its MPIJob manifest compared with hand-written dicts, and its
create / watch / delete / recover logic through the official ``kubernetes`` client against a
FAKE of the Kubernetes API (`fake_kubernetes_api`: a real HTTP server on loopback with the
few endpoints the launcher calls). It is a fake because no API server, nor the MPI Operator,
can run on these machines; the tests play the operator's part by setting the MPIJob's status.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jobkit
import pytest

from dptrain.coordinator.server.job_files import JobPaths, read_run_record
from dptrain.coordinator.server.launchers.base import LaunchError, WorkerLaunch
from dptrain.coordinator.server.launchers.kubernetes_manifest import (
    KubernetesSettings,
    mpijob_manifest,
    mpijob_name,
    pod_environment,
    token_secret_manifest,
)

JOB = "j-0123456789ab"
ROOT = "/var/lib/dptrain/jobs/j-0123456789ab"
ENV = {"DPTRAIN_COORDINATOR": "dptrain-coordinator.ml.svc:50051", "DPTRAIN_JOB_ID": JOB,
       "DPTRAIN_JOB_TOKEN": "s3cret-token", "DPTRAIN_RUN_ID": f"{JOB}.1.ab",
       "DPTRAIN_HEARTBEAT_TIMEOUT": "60.0", "PYTHONUNBUFFERED": "1",
       "HOME": "/home/dptrain", "PATH": "/opt/dptrain/bin:/usr/bin"}


def attempt(ranks=2, attempt_no=1, root=ROOT, env=None):
    """An attempt of job `JOB` as the runner hands it to a launcher."""
    return WorkerLaunch(JOB, attempt_no, f"{JOB}.{attempt_no}.ab", (("localhost", ranks),),
                        JobPaths(Path(root)), dict(ENV if env is None else env),
                        resume=attempt_no > 1)


# ---------------------------------------------------------------- the manifest (pure)

LABELS = {"app.kubernetes.io/name": "dptrain", "app.kubernetes.io/component": "worker",
          "dptrain/job-id": JOB, "dptrain/attempt": "1"}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
STATE_MOUNT = [{"name": "state", "mountPath": ROOT, "subPath": "jobs/j-0123456789ab"}]
STATE_VOLUME = [{"name": "state", "persistentVolumeClaim": {"claimName": "dptrain-state"}}]


def test_manifest_of_a_first_attempt():
    settings = KubernetesSettings(image="registry.example.org/dptrain:0.1.0", namespace="ml")
    expected_command = [
        "sh", "-c",
        "umask 077; exec \"$@\" >>/var/lib/dptrain/jobs/j-0123456789ab/worker.log 2>&1", "sh",
        "/opt/dptrain/bin/mpiexec", "-n", "2",
        "-genv", "OMP_NUM_THREADS", "1", "-genv", "OPENBLAS_NUM_THREADS", "1",
        "-genv", "MKL_NUM_THREADS", "1",
        "/opt/dptrain/bin/python", "-m", "mpi4py", "-m", "dptrain.worker",
        f"{ROOT}/spec.json", "--checkpoint-dir", f"{ROOT}/checkpoints", "--no-progress"]
    expected = {
        "apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob",
        "metadata": {"name": "dptrain-j-0123456789ab-1", "namespace": "ml", "labels": LABELS},
        "spec": {
            "slotsPerWorker": 1, "mpiImplementation": "MPICH",
            "sshAuthMountPath": "/home/dptrain/.ssh",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "Running"},
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "Never", "template": {
                    "metadata": {"labels": LABELS},
                    "spec": {"securityContext": POD_SECURITY, "containers": [{
                        "name": "launcher", "command": expected_command,
                        "env": [
                            {"name": "DPTRAIN_COORDINATOR",
                             "value": "dptrain-coordinator.ml.svc:50051"},
                            {"name": "DPTRAIN_HEARTBEAT_TIMEOUT", "value": "60.0"},
                            {"name": "DPTRAIN_JOB_ID", "value": JOB},
                            {"name": "DPTRAIN_RUN_ID", "value": f"{JOB}.1.ab"},
                            {"name": "PYTHONUNBUFFERED", "value": "1"},
                            {"name": "DPTRAIN_JOB_TOKEN", "valueFrom": {"secretKeyRef": {
                                "name": "dptrain-j-0123456789ab-1", "key": "token"}}}],
                        "image": "registry.example.org/dptrain:0.1.0",
                        "volumeMounts": STATE_MOUNT, "securityContext": CONTAINER_SECURITY}],
                        "volumes": STATE_VOLUME}}},
                "Worker": {"replicas": 2, "restartPolicy": "Never", "template": {
                    "metadata": {"labels": LABELS},
                    "spec": {"securityContext": POD_SECURITY, "containers": [{
                        "name": "worker",
                        "command": ["/usr/sbin/sshd", "-De", "-f",
                                    "/home/dptrain/.sshd_config"],
                        "readinessProbe": {"tcpSocket": {"port": 2222},
                                           "initialDelaySeconds": 1, "periodSeconds": 2},
                        "image": "registry.example.org/dptrain:0.1.0",
                        "volumeMounts": STATE_MOUNT, "securityContext": CONTAINER_SECURITY}],
                        "volumes": STATE_VOLUME}}},
            },
        },
    }
    assert mpijob_manifest(settings, attempt()) == expected


def test_manifest_of_a_restart_packs_ranks_into_worker_pods_with_resources_and_tls():
    settings = KubernetesSettings(image="img:1", slots_per_worker=2, cpu_per_rank="500m",
                                  memory_per_rank="2Gi", tls_secret="dptrain-tls",
                                  service_account="dptrain-worker", image_pull_policy="Always")
    manifest = mpijob_manifest(settings, attempt(ranks=5, attempt_no=3))
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "dptrain-j-0123456789ab-3"
    assert spec["slotsPerWorker"] == 2
    assert spec["mpiReplicaSpecs"]["Worker"]["replicas"] == 3  # 5 ranks, 2 per pod: 2+2+1
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    command = launcher["containers"][0]["command"]
    assert command[4:7] == ["/opt/dptrain/bin/mpiexec", "-n", "5"]
    assert command[-4:] == ["--checkpoint-dir", f"{ROOT}/checkpoints", "--resume",
                            "--no-progress"]
    # 2 ranks per pod: twice the per-rank request (500m x 2 = 1 CPU, 2Gi x 2 = 4Gi)
    assert worker["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}}
    # the CA only: the coordinator's key in the same Secret never reaches a pod
    tls_volume = {"name": "tls", "secret": {"secretName": "dptrain-tls",
                                            "items": [{"key": "ca.pem", "path": "ca.pem"}]}}
    tls_mount = {"name": "tls", "mountPath": "/etc/dptrain/tls", "readOnly": True}
    for pod in (launcher, worker):
        assert pod["volumes"] == [*STATE_VOLUME, tls_volume]
        assert pod["containers"][0]["volumeMounts"] == [*STATE_MOUNT, tls_mount]
        assert pod["serviceAccountName"] == "dptrain-worker"
        assert pod["containers"][0]["imagePullPolicy"] == "Always"


def test_the_token_is_only_in_the_secret():
    settings = KubernetesSettings(image="img:1")
    manifest = mpijob_manifest(settings, attempt())
    assert "s3cret-token" not in str(manifest)
    assert token_secret_manifest(settings, attempt()) == {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "dptrain-j-0123456789ab-1", "namespace": "default",
                     "labels": LABELS},
        "stringData": {"token": "s3cret-token"}}


def test_pods_get_the_attempts_variables_not_the_coordinators():
    assert pod_environment(ENV) == {
        "DPTRAIN_COORDINATOR": "dptrain-coordinator.ml.svc:50051",
        "DPTRAIN_HEARTBEAT_TIMEOUT": "60.0", "DPTRAIN_JOB_ID": JOB,
        "DPTRAIN_RUN_ID": f"{JOB}.1.ab", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize(("job_id", "attempt_no", "name"), [
    ("j-0123456789ab", 1, "dptrain-j-0123456789ab-1"),
    ("J_Odd.Name", 12, "dptrain-j-odd-name-12"),
    ("x" * 80, 7, "dptrain-" + "x" * 42 + "-7"),  # 52 characters: room for -launcher
])
def test_mpijob_names_are_dns_labels_unique_per_attempt(job_id, attempt_no, name):
    assert mpijob_name(job_id, attempt_no) == name
    assert len(name) <= 52


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image": ""}, "image: must be a container image reference without spaces, got ''"),
    ({"image": "a b"}, "image: must be a container image reference without spaces"),
    ({"image": "i", "namespace": "ML"}, "namespace: must be a DNS label"),
    ({"image": "i", "slots_per_worker": 0}, "slots_per_worker: must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        KubernetesSettings(**kwargs)


@pytest.mark.parametrize("field", ["cpu_per_rank", "memory_per_rank"])
def test_a_bad_per_rank_quantity_is_refused(field):
    with pytest.raises(ValueError, match=rf"^{field}: must be an integer with an optional unit "
                                         rf"\(500m, 2Gi\), got '2 GB'$"):
        KubernetesSettings(image="i", **{field: "2 GB"})


def test_with_tls_the_workers_verify_with_the_mounted_ca():
    settings = KubernetesSettings(image="i", tls_secret="dptrain-tls")
    env = {**ENV, "DPTRAIN_TLS_CA": "/etc/dptrain/tls/..2026_12_06/ca.pem"}  # as resolved
    manifest = mpijob_manifest(settings, attempt(env=env))
    launcher = manifest["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    assert {"name": "DPTRAIN_TLS_CA", "value": "/etc/dptrain/tls/ca.pem"} in (
        launcher["containers"][0]["env"])


@pytest.mark.mpi
@pytest.mark.slow
def test_the_launcher_pods_command_trains_the_job_into_its_directory(tmp_path):
    # The launcher container's command, run here with this venv in place of the image's (Hydra
    # starts both ranks on this machine where, in a cluster, it would ssh to the worker pods):
    # the output lands in the job's log, with the final metrics, and checkpoints in its dir.
    paths = JobPaths(tmp_path / "jobs" / JOB)
    paths.checkpoints.mkdir(parents=True)
    paths.spec.write_text(json.dumps(jobkit.spec(jobkit.TINY_SPEC, workers=2)))
    env = {"DPTRAIN_JOB_ID": JOB, "DPTRAIN_JOB_TOKEN": "t", "DPTRAIN_RUN_ID": f"{JOB}.1.ab",
           "PYTHONUNBUFFERED": "1"}
    launch = WorkerLaunch(JOB, 1, f"{JOB}.1.ab", (("pod", 2),), paths, env, resume=False)
    manifest = mpijob_manifest(KubernetesSettings(image="i", python=sys.executable), launch)
    (container,) = manifest["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"][
        "containers"]
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    pod_env.update(DPTRAIN_JOB_TOKEN="t", PATH=os.environ["PATH"])
    result = subprocess.run(container["command"], env=pod_env, capture_output=True, text=True,
                            timeout=300)
    log = paths.log.read_text()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), log
    final = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    assert (final["status"], final["step"]) == ("completed", 20)
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == [
        "step-00000015", "step-00000020"]  # every 5 steps, the last 2 kept
    assert paths.log.stat().st_mode & 0o077 == 0  # umask 077: private, as the runner's


# ---------------------------------------------------------------- against the FAKE API server

kubernetes = pytest.importorskip(
    "kubernetes", reason="the kubernetes launcher tests need the 'kubernetes' package "
                         "(pip install 'dptrain[kubernetes]'; CI installs it)")
from fake_kubernetes_api import FakeKubernetesApi  # noqa: E402

from dptrain.coordinator.server.launchers.kubernetes import (  # noqa: E402
    KubernetesLauncher,
    launcher_exit_code,
)

NAME = "dptrain-j-0123456789ab-1"


@pytest.fixture
def fake_api():
    api = FakeKubernetesApi().start()
    yield api
    api.stop()


@pytest.fixture
def launcher(fake_api):
    return KubernetesLauncher(KubernetesSettings(image="img:1", namespace="ml"),
                              configuration=fake_api.configuration())


def start(launcher, tmp_path, attempt_no=1):
    launch = attempt(root=str(tmp_path / "jobs" / JOB), attempt_no=attempt_no)
    launch.paths.root.mkdir(parents=True, exist_ok=True)
    output = io.BytesIO()
    return launch, launcher.start(launch, output), output.getvalue().decode()


def test_start_creates_the_secret_and_the_mpijob_and_records_its_name(fake_api, launcher,
                                                                      tmp_path):
    launch, handle, said = start(launcher, tmp_path)
    mpijob = fake_api.get("mpijobs", "ml", NAME)
    assert mpijob is not None
    sent = {k: v for k, v in mpijob.items()}
    sent["metadata"] = {k: v for k, v in mpijob["metadata"].items() if k != "uid"}
    assert sent == mpijob_manifest(launcher.settings, launch)
    secret = fake_api.get("secrets", "ml", NAME)
    assert secret["stringData"] == {"token": "s3cret-token"}
    assert secret["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "name": NAME,
        "uid": mpijob["metadata"]["uid"], "blockOwnerDeletion": False}]
    record = read_run_record(launch.paths.run)
    assert (record["mpijob"], record["namespace"], record["attempt"]) == (NAME, "ml", 1)
    assert said == f"[dptrain] created MPIJob ml/{NAME}: 2 rank(s) on 2 worker pod(s) of img:1\n"
    assert handle.description == f"MPIJob ml/{NAME}"


def test_running_then_succeeded_is_exit_0_and_reap_deletes_it(fake_api, launcher, tmp_path):
    _, handle, _ = start(launcher, tmp_path)
    assert handle.poll() is None  # created: no condition yet
    assert not handle.started()  # its pods wait for nodes: no heartbeat clock yet
    fake_api.set_condition("ml", NAME, "Running")
    assert handle.poll() is None
    assert handle.started()
    fake_api.set_condition("ml", NAME, "Succeeded")
    assert handle.poll() == 0
    handle.reap()
    assert fake_api.get("mpijobs", "ml", NAME) is None
    assert fake_api.get("secrets", "ml", NAME) is None  # owned by the MPIJob
    assert handle.poll() == 0  # the outcome stays what it was


@pytest.mark.parametrize(("pod_exit", "code"), [(3, 3), (2, 2), (137, 137), (None, 1)])
def test_failed_is_the_launcher_pods_exit_code(fake_api, launcher, tmp_path, pod_exit, code):
    _, handle, _ = start(launcher, tmp_path)
    if pod_exit is not None:
        fake_api.add_launcher_pod("ml", NAME, pod_exit)
    fake_api.set_condition("ml", NAME, "Failed")
    assert handle.poll() == code


def test_terminate_deletes_the_mpijob_with_its_grace_period(fake_api, launcher, tmp_path):
    _, handle, _ = start(launcher, tmp_path)
    handle.terminate()
    deletes = [r for r in fake_api.requests if r.method == "DELETE" and r.kind == "mpijobs"]
    assert [(r.name, r.query.get("gracePeriodSeconds")) for r in deletes] == [(NAME, None)]
    assert deletes[0].query["propagationPolicy"] == ["Foreground"]
    assert fake_api.get("mpijobs", "ml", NAME) is None
    assert fake_api.get("secrets", "ml", NAME) is None
    assert handle.poll() == 128 + 15


def test_a_terminated_attempt_ends_only_when_its_pods_are_gone(fake_api, launcher, tmp_path):
    fake_api.on_deleted = lambda mpijob, grace: None  # pods that take their time to end
    _, handle, _ = start(launcher, tmp_path)
    fake_api.set_condition("ml", NAME, "Failed")  # what an operator may say as pods go
    handle.terminate()
    assert fake_api.get("mpijobs", "ml", NAME)["metadata"]["deletionTimestamp"]
    assert handle.poll() is None  # its ranks may still write into the job's directory
    fake_api.finish_deletion("ml", NAME)
    assert handle.poll() == 128 + 15


def test_kill_deletes_it_at_once(fake_api, launcher, tmp_path):
    _, handle, _ = start(launcher, tmp_path)
    handle.kill()
    deletes = [r for r in fake_api.requests if r.method == "DELETE" and r.kind == "mpijobs"]
    assert [(r.name, r.query.get("gracePeriodSeconds")) for r in deletes] == [(NAME, ["0"])]
    assert handle.poll() == 128 + 9


def test_a_vanished_mpijob_reports_minus_one(fake_api, launcher, tmp_path):
    _, handle, _ = start(launcher, tmp_path)
    with fake_api.lock:
        del fake_api.objects[("mpijobs", "ml", NAME)]
    assert handle.poll() == -1


def test_recover_finds_the_mpijob_from_the_run_record(fake_api, launcher, tmp_path):
    launch, _, _ = start(launcher, tmp_path)
    # a new coordinator (process): a new launcher, the same state directory
    again = KubernetesLauncher(launcher.settings, configuration=fake_api.configuration())
    recovered = again.recover(launch.paths)
    assert recovered is not None and recovered.description == f"MPIJob ml/{NAME} (recovered)"
    assert recovered.poll() is None
    recovered.terminate()
    assert fake_api.get("mpijobs", "ml", NAME) is None
    assert again.recover(launch.paths) is None  # gone: nothing to recover
    assert again.recover(JobPaths(tmp_path / "jobs" / "j-none")) is None  # no run record


def test_a_refused_create_is_a_launch_error_and_leaves_nothing(fake_api, launcher, tmp_path):
    with fake_api.lock:  # an MPIJob of that name exists already: the API answers 409
        fake_api.objects[("mpijobs", "ml", NAME)] = {"metadata": {"name": NAME, "uid": "u"}}
    with pytest.raises(LaunchError, match=f"^kubernetes: cannot create MPIJob ml/{NAME}: 409 "):
        start(launcher, tmp_path)
    assert fake_api.get("secrets", "ml", NAME) is None  # the token does not linger
    assert fake_api.get("mpijobs", "ml", NAME) == {"metadata": {"name": NAME, "uid": "u"}}


def test_without_the_operator_the_error_says_so(tmp_path):
    api = FakeKubernetesApi(mpijob_crd=False).start()
    try:
        launcher = KubernetesLauncher(KubernetesSettings(image="img:1", namespace="ml"),
                                      configuration=api.configuration())
        with pytest.raises(LaunchError, match="404 .*is the MPI Operator installed"):
            start(launcher, tmp_path)
        assert api.get("secrets", "ml", NAME) is None
    finally:
        api.stop()


def test_an_unreachable_api_server_is_a_launch_error_naming_it(tmp_path):
    api = FakeKubernetesApi().start()
    configuration = api.configuration()
    api.stop()  # nothing listens there any more
    launcher = KubernetesLauncher(KubernetesSettings(image="img:1", namespace="ml"),
                                  configuration=configuration)
    with pytest.raises(LaunchError, match=f"^kubernetes: cannot create MPIJob ml/{NAME}: cannot "
                                          f"reach the API server at {api.url}: "):
        start(launcher, tmp_path)
    launch = attempt(root=str(tmp_path / "jobs" / JOB))
    with pytest.raises(LaunchError, match=f"^kubernetes: cannot look for MPIJob ml/{NAME} of "
                                          f"job {JOB}: cannot reach the API server"):
        launcher.recover(launch.paths)  # run.json names it: it may still run


def test_launcher_exit_code_takes_the_newest_terminated_pod():
    def pod(created, code):
        return {"metadata": {"creationTimestamp": created}, "status": {"containerStatuses": [
            {"state": {"terminated": {"exitCode": code}}}]}}

    assert launcher_exit_code({"items": [pod("2026-01-01T00:00:02Z", 3),
                                         pod("2026-01-01T00:00:01Z", 1)]}) == 3
    assert launcher_exit_code({"items": [{"status": {"containerStatuses": [
        {"state": {"running": {}}}]}}]}) is None
    assert launcher_exit_code({"items": []}) is None


def test_without_the_package_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if it were not installed
    with pytest.raises(LaunchError, match=r"needs the Python package 'kubernetes': "
                                          r"pip install 'dptrain\[kubernetes\]'"):
        KubernetesLauncher(KubernetesSettings(image="img:1"))
