"""The Kubeflow ``MPIJob`` of one attempt: a pure function of `KubernetesSettings` and the
`WorkerLaunch` (tested against expected dicts, and validated against the MPI Operator's CRD
schema vendored in ``deploy/kubernetes/crds/``).

The shape, and why:

* ``kubeflow.org/v2beta1``, ``mpiImplementation: MPICH``: the image's ``mpiexec`` is MPICH's
  Hydra (the ``mpich`` wheel). The operator starts the worker pods (``sshd``), writes their
  names into a hostfile it hands to Hydra (``HYDRA_HOST_FILE``), then starts the launcher pod,
  whose ``mpiexec`` reaches the workers over ssh.
* The job's files reach the pods through the coordinator's state volume (a ReadWriteMany
  PersistentVolumeClaim), not a ConfigMap: the ranks read the spec, rank 0 writes checkpoints
  and the launcher appends the output to ``worker.log`` exactly where the coordinator reads
  them, at the same paths as on the coordinator. Each pod mounts only its own job's directory
  (``subPath: jobs/ID``), never the database, the blobs or the coordinator's token.
* The worker token is in a Secret of the attempt's name (created by the launcher beside the
  MPIJob), which the launcher container references by ``secretKeyRef``: it never appears in
  the manifest. Hydra passes the launcher's environment on to every rank.
* The coordinator restarts failed attempts itself, from the latest checkpoint: the operator
  must not (``backoffLimit: 0``, ``restartPolicy: Never``).
* Everything runs as the image's non-root user (uid 1000), the same as the coordinator, so
  the files the ranks write on the shared volume are the coordinator's to read.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from dptrain.coordinator.server.launchers.base import WorkerLaunch
from dptrain.worker import environment as worker_env
from dptrain.worker.mpiexec_command import LaunchSettings, mpiexec_command

__all__ = ["KubernetesSettings", "settings_from_options", "mpijob_manifest",
           "token_secret_manifest", "mpijob_name", "pod_environment", "API_VERSION", "GROUP",
           "VERSION", "PLURAL", "TOKEN_KEY", "IMAGE_PYTHON", "IMAGE_UID"]

GROUP, VERSION, PLURAL = "kubeflow.org", "v2beta1", "mpijobs"
API_VERSION = f"{GROUP}/{VERSION}"
#: The key of the attempt's Secret that holds the worker token.
TOKEN_KEY = "token"
#: The interpreter of the image ``deploy/Dockerfile`` builds (its venv).
IMAGE_PYTHON = "/opt/dptrain/bin/python"
#: The image's non-root user (and group); the coordinator runs as the same.
IMAGE_UID = 1000
_IMAGE_HOME = "/home/dptrain"
_SSH_PORT = 2222  # sshd runs as the non-root user: above 1024
_STATE_VOLUME = "state"
_TLS_VOLUME = "tls"
_NAME_LIMIT = 52  # the operator derives longer names (NAME-launcher, NAME-worker-N, services)
_K8S_NAME_SAFE = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how the kubernetes launcher runs each attempt as an MPIJob.

    Attributes:
        image: the container image of the workers (``deploy/Dockerfile``), e.g.
            ``registry.example.org/dptrain:0.1.0``.
        namespace: the namespace of the MPIJobs (the coordinator's own, for its Role).
        state_claim: the PersistentVolumeClaim holding the coordinator's state directory
            (ReadWriteMany); each pod mounts its job's directory from it.
        slots_per_worker: ranks per worker pod (the operator's ``slotsPerWorker``).
        python: the interpreter in the image.
        tls_secret: a Secret holding the CA certificate the workers verify the coordinator
            with (key `tls_ca_key`; ``dptrain tls init``'s file names, as
            ``deploy/kubernetes`` makes it); only that key is mounted, at `tls_dir`, never the
            coordinator's own key beside it; the workers' ``DPTRAIN_TLS_CA`` names the file
            there (None: the coordinator listens without TLS).
        tls_dir: where `tls_secret`'s CA certificate is mounted.
        tls_ca_key: the key of `tls_secret` that holds the CA certificate.
        blas_threads: BLAS/OpenMP threads per rank.
        cpu_per_rank: the CPU request (and limit) of a worker pod per slot, e.g. ``"1"``
            (None: no resources are set).
        memory_per_rank: the memory request (and limit) per slot, e.g. ``"2Gi"``.
        service_account: the pods' service account (None: the namespace's default).
        image_pull_policy: the containers' ``imagePullPolicy`` (None: Kubernetes' default).
    """

    image: str
    namespace: str = "default"
    state_claim: str = "dptrain-state"
    slots_per_worker: int = 1
    python: str = IMAGE_PYTHON
    tls_secret: str | None = None
    tls_dir: str = "/etc/dptrain/tls"
    tls_ca_key: str = "ca.pem"
    blas_threads: int = 1
    cpu_per_rank: str | None = None
    memory_per_rank: str | None = None
    service_account: str | None = None
    image_pull_policy: str | None = None

    def __post_init__(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image: must be a container image reference without spaces, "
                             f"got {self.image!r}")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.namespace):
            raise ValueError(f"namespace: must be a DNS label (lowercase letters, digits, "
                             f"'-'), got {self.namespace!r}")
        slots = self.slots_per_worker
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots_per_worker: must be an integer >= 1, got {slots!r}")
        for name in ("cpu_per_rank", "memory_per_rank"):
            if (quantity := getattr(self, name)) is not None:
                _times(name, quantity, slots)


def settings_from_options(options: Any) -> KubernetesSettings:
    """The settings from the kubernetes options of ``dptrain serve`` and ``dptrain render-job``
    (``coordinator.client.commands.add_kubernetes_options``).

    Raises:
        ValueError: an option is missing or wrong (the message names it).
    """
    if not options.image:
        raise ValueError("--image: the kubernetes launcher needs the workers' container image "
                         "(built from deploy/Dockerfile)")
    try:
        return KubernetesSettings(
            image=options.image, namespace=options.namespace, state_claim=options.state_claim,
            slots_per_worker=options.slots_per_worker, tls_secret=options.tls_secret,
            cpu_per_rank=options.cpu_per_rank, memory_per_rank=options.memory_per_rank)
    except ValueError as e:  # name the option, not the field
        field_name, _, rule = str(e).partition(": ")
        raise ValueError(f"--{field_name.replace('_', '-')}: {rule}") from None


def mpijob_name(job_id: str, attempt: int) -> str:
    """The MPIJob (and token Secret) of one attempt: ``dptrain-ID-ATTEMPT``, a DNS label.

    Each attempt has a name of its own: the previous attempt's MPIJob may still be going away
    when the next one is created.
    """
    base = _K8S_NAME_SAFE.sub("-", f"dptrain-{job_id}".lower()).strip("-")
    suffix = f"-{attempt}"
    return base[:_NAME_LIMIT - len(suffix)].rstrip("-") + suffix


def pod_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of an attempt's environment that go into its pods.

    Only the attempt's own (``DPTRAIN_*``, ``PYTHONUNBUFFERED``): the rest of the runner's
    environment is the coordinator's, not the workers'. The worker token is left out here;
    the manifest references it from the attempt's Secret.
    """
    return {name: value for name, value in sorted(env.items())
            if (name.startswith("DPTRAIN_") or name == "PYTHONUNBUFFERED")
            and name != worker_env.JOB_TOKEN}


def _labels(launch: WorkerLaunch) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dptrain", "app.kubernetes.io/component": "worker",
            "dptrain/job-id": _K8S_NAME_SAFE.sub("-", launch.job_id.lower())[:63],
            "dptrain/attempt": str(launch.attempt)}


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_spec(settings: KubernetesSettings, launch: WorkerLaunch, container: dict[str, Any],
              ) -> dict[str, Any]:
    """A pod of the attempt: its job's directory from the state volume, as the image's user."""
    job_dir = PurePosixPath(launch.paths.root)
    mounts = [{"name": _STATE_VOLUME, "mountPath": str(job_dir),
               "subPath": str(job_dir.relative_to(job_dir.parent.parent))}]
    volumes: list[dict[str, Any]] = [{"name": _STATE_VOLUME, "persistentVolumeClaim": {
        "claimName": settings.state_claim}}]
    if settings.tls_secret:
        mounts.append({"name": _TLS_VOLUME, "mountPath": settings.tls_dir, "readOnly": True})
        # The CA only: the Secret also holds the coordinator's key, which no job may read.
        volumes.append({"name": _TLS_VOLUME, "secret": {
            "secretName": settings.tls_secret,
            "items": [{"key": settings.tls_ca_key, "path": settings.tls_ca_key}]}})
    container = {**container, "image": settings.image, "volumeMounts": mounts,
                 "securityContext": _security_context()}
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID,
                            "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID},
        "containers": [container], "volumes": volumes}
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    return spec


def _resources(settings: KubernetesSettings) -> dict[str, Any] | None:
    amounts = {}
    if settings.cpu_per_rank:
        amounts["cpu"] = _times("cpu_per_rank", settings.cpu_per_rank,
                                settings.slots_per_worker)
    if settings.memory_per_rank:
        amounts["memory"] = _times("memory_per_rank", settings.memory_per_rank,
                                   settings.slots_per_worker)
    return {"requests": amounts, "limits": dict(amounts)} if amounts else None


def _times(field_name: str, quantity: str, n: int) -> str:
    """A Kubernetes quantity times `n` (``"2Gi"`` x 2 = ``"4Gi"``; ``"500m"`` x 2 = ``"1"``)."""
    match = re.fullmatch(r"(\d+)(m|[KMGTPE]i?)?", quantity)
    if not match:
        raise ValueError(f"{field_name}: must be an integer with an optional unit (500m, 2Gi), "
                         f"got {quantity!r}")
    value, unit = int(match.group(1)) * n, match.group(2) or ""
    if unit == "m" and value % 1000 == 0:
        return str(value // 1000)
    return f"{value}{unit}"


def mpijob_manifest(settings: KubernetesSettings, launch: WorkerLaunch) -> dict[str, Any]:
    """The MPIJob that runs one attempt.

    Args:
        settings: the launcher's settings.
        launch: the attempt (its paths are the coordinator's; the pods see the job's
            directory at the same path).

    Returns:
        The manifest, as the Kubernetes API takes it (JSON-able).
    """
    name = mpijob_name(launch.job_id, launch.attempt)
    paths = launch.paths
    pods = -(-launch.workers // settings.slots_per_worker)
    command = mpiexec_command(LaunchSettings(
        job=str(paths.spec), workers=launch.workers, checkpoint_dir=str(paths.checkpoints),
        resume=launch.resume, bind_to=None, blas_threads=settings.blas_threads, progress=False,
        python=settings.python))
    # The launcher pod's output goes to the job's log on the shared volume, where the runner
    # reads progress and the final metrics; `exec` makes mpiexec the container's first
    # process, so it gets the pod's SIGTERM and passes it on to every rank.
    shell = f"umask 077; exec \"$@\" >>{shlex.quote(str(paths.log))} 2>&1"
    variables = pod_environment(launch.env)
    if settings.tls_secret:  # the coordinator's path of its CA file is not the pods'
        variables[worker_env.TLS_CA] = f"{settings.tls_dir}/{settings.tls_ca_key}"
    env = [{"name": k, "value": v} for k, v in sorted(variables.items())]
    env.append({"name": worker_env.JOB_TOKEN, "valueFrom": {"secretKeyRef": {
        "name": name, "key": TOKEN_KEY}}})
    launcher = {"name": "launcher", "command": ["sh", "-c", shell, "sh", *command], "env": env}
    worker: dict[str, Any] = {
        "name": "worker",
        "command": ["/usr/sbin/sshd", "-De", "-f", f"{_IMAGE_HOME}/.sshd_config"],
        "readinessProbe": {"tcpSocket": {"port": _SSH_PORT}, "initialDelaySeconds": 1,
                           "periodSeconds": 2}}
    if (resources := _resources(settings)) is not None:
        worker["resources"] = resources
    return {
        "apiVersion": API_VERSION, "kind": "MPIJob",
        "metadata": {"name": name, "namespace": settings.namespace,
                     "labels": _labels(launch)},
        "spec": {
            "slotsPerWorker": settings.slots_per_worker,
            "mpiImplementation": "MPICH",
            "sshAuthMountPath": f"{_IMAGE_HOME}/.ssh",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "Running"},
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "Never", "template": {
                    "metadata": {"labels": _labels(launch)},
                    "spec": _pod_spec(settings, launch, launcher)}},
                "Worker": {"replicas": pods, "restartPolicy": "Never", "template": {
                    "metadata": {"labels": _labels(launch)},
                    "spec": _pod_spec(settings, launch, worker)}},
            },
        },
    }


def token_secret_manifest(settings: KubernetesSettings, launch: WorkerLaunch
                          ) -> dict[str, Any]:
    """The Secret that carries the attempt's worker token to its launcher pod.

    Args:
        settings: the launcher's settings.
        launch: the attempt (its environment holds the token).

    Returns:
        The manifest (``stringData``: the API server stores it base64-encoded).
    """
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": mpijob_name(launch.job_id, launch.attempt),
                         "namespace": settings.namespace, "labels": _labels(launch)},
            "stringData": {TOKEN_KEY: launch.env[worker_env.JOB_TOKEN]}}
