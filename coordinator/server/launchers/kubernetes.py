"""`KubernetesLauncher`: each attempt of a job as one Kubeflow ``MPIJob``, created, watched and
deleted through the Kubernetes API (the official ``kubernetes`` Python client: the optional
extra ``dptrain[kubernetes]``, imported here only, when the launcher is made).

The manifest is a pure function (`kubernetes_manifest.mpijob_manifest`). One attempt is:

1. a Secret holding the attempt's worker token (the MPIJob's launcher pod references it);
2. the MPIJob itself, named ``dptrain-ID-ATTEMPT`` (`mpijob_name`); its name and namespace
   go into the run record (``run.json``) first, so that a restarted coordinator finds the
   attempt again (`KubernetesLauncher.recover`);
3. the Secret then gets the MPIJob as its owner, so Kubernetes deletes it with the MPIJob.

The attempt's state is the MPIJob's status conditions, polled: until one is true (``Running``
first), its pods wait to be scheduled and the attempt has not started (`RunHandle.started`:
the runner's heartbeat clock waits); ``Succeeded`` is exit 0;
``Failed`` is the launcher pod's exit code (the worker's own: 2 invalid job, 3 diverged, ...),
or 1 when that pod is gone. Terminating deletes the MPIJob in the foreground (its pods get
SIGTERM; the launcher pod's ``mpiexec`` passes it on to the ranks) and the attempt has ended
when the MPIJob is gone, which is after its pods; killing deletes it with no grace period. A
finished attempt's MPIJob is deleted once the runner has its last log lines (`RunHandle.reap`).
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any

from dptrain.coordinator.server.job_files import JobPaths, read_run_record, write_run_record
from dptrain.coordinator.server.launchers.base import Launcher, LaunchError, RunHandle, WorkerLaunch
from dptrain.coordinator.server.launchers.kubernetes_manifest import (
    GROUP,
    PLURAL,
    VERSION,
    KubernetesSettings,
    mpijob_manifest,
    mpijob_name,
    token_secret_manifest,
)

__all__ = ["KubernetesLauncher", "KubernetesSettings", "EXTRA_HINT", "launcher_exit_code",
           "condition", "has_run"]

log = logging.getLogger("dptrain.coordinator.kubernetes")

#: How to install what this launcher needs.
EXTRA_HINT = "pip install 'dptrain[kubernetes]'"
_TERMINATED, _KILLED = 128 + 15, 128 + 9  # what a deleted attempt reports, as a signal would
_GONE = -1  # an attempt that vanished without this coordinator's doing
_TIMEOUT_S = 30  # per API call: an API server that does not answer must not hang the runner


def _urllib3_error() -> type[Exception]:
    import urllib3

    return urllib3.exceptions.HTTPError


def _import_client() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise LaunchError(f"the kubernetes launcher needs the Python package 'kubernetes': "
                          f"{EXTRA_HINT}") from None
    return kubernetes


class KubernetesLauncher(Launcher):
    """Starts each attempt as an MPIJob of the MPI Operator (``kubeflow.org/v2beta1``).

    Args:
        settings: the image, namespace, state volume, ... of the MPIJobs.
        configuration: a ``kubernetes.client.Configuration`` to talk to the API server with
            (default: the pod's service account inside a cluster, else ``$KUBECONFIG`` or
            ``~/.kube/config``).

    Raises:
        LaunchError: the ``kubernetes`` package is missing, or no configuration is found.
    """

    def __init__(self, settings: KubernetesSettings, configuration: Any = None):
        self.settings = settings
        k8s = _import_client()
        if configuration is None:
            configuration = k8s.client.Configuration()
            try:
                k8s.config.load_incluster_config(client_configuration=configuration)
            except k8s.config.ConfigException:
                try:  # read $KUBECONFIG now: the client read it when it was imported
                    k8s.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                                client_configuration=configuration)
                except (k8s.config.ConfigException, OSError) as e:
                    raise LaunchError(f"kubernetes: no API server configured (neither in a "
                                      f"cluster nor in $KUBECONFIG or ~/.kube/config): "
                                      f"{e}") from None
        api = k8s.client.ApiClient(configuration)
        self._ApiException = k8s.client.ApiException
        # what a call raises: an answer of the API server, or none (urllib3, under the client)
        self._errors = (k8s.client.ApiException, _urllib3_error())
        self._host = configuration.host
        self._custom = k8s.client.CustomObjectsApi(api)
        self._core = k8s.client.CoreV1Api(api)

    def manifest(self, launch: WorkerLaunch) -> dict[str, Any]:
        """The MPIJob of one attempt (`kubernetes_manifest.mpijob_manifest`)."""
        return mpijob_manifest(self.settings, launch)

    def start(self, launch: WorkerLaunch, output: IO[bytes]) -> RunHandle:
        """Create the attempt's token Secret and MPIJob (see the module docstring)."""
        ns = self.settings.namespace
        name = mpijob_name(launch.job_id, launch.attempt)
        manifest = self.manifest(launch)
        try:
            write_run_record(launch.paths.run, {**launch.record(), "launcher": "kubernetes",
                                                "mpijob": name, "namespace": ns})
        except OSError as e:
            raise LaunchError(f"{e.filename}: {e.strerror or e}") from None
        created = None
        try:
            self._core.create_namespaced_secret(ns, token_secret_manifest(self.settings, launch),
                                                _request_timeout=_TIMEOUT_S)
            created = self._custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, manifest, _request_timeout=_TIMEOUT_S)
            owner = {"apiVersion": manifest["apiVersion"], "kind": manifest["kind"],
                     "name": name, "uid": created["metadata"]["uid"],
                     "blockOwnerDeletion": False}
            self._core.patch_namespaced_secret(name, ns, {"metadata": {
                "ownerReferences": [owner]}}, _request_timeout=_TIMEOUT_S)
        except self._errors as e:
            if created is not None:
                self._delete(ns, name, grace=0)
            self._delete_secret(ns, name, grace=0)  # the token must not outlive the attempt
            raise LaunchError(f"kubernetes: cannot create MPIJob {ns}/{name}: "
                              f"{self._describe(e)}") from None
        output.write(f"[dptrain] created MPIJob {ns}/{name}: {launch.workers} rank(s) on "
                     f"{manifest['spec']['mpiReplicaSpecs']['Worker']['replicas']} worker "
                     f"pod(s) of {self.settings.image}\n".encode())
        output.flush()
        return _MPIJobRun(self, ns, name)

    def recover(self, paths: JobPaths) -> RunHandle | None:
        """The MPIJob named in the run record, if it still exists."""
        record = read_run_record(paths.run) or {}
        name, ns = record.get("mpijob"), record.get("namespace")
        if not isinstance(name, str) or not isinstance(ns, str):
            return None
        try:
            if self._read(ns, name) is None:
                return None
        except self._errors as e:  # it may run: starting over beside it could corrupt the job
            raise LaunchError(f"kubernetes: cannot look for MPIJob {ns}/{name} of job "
                              f"{record.get('job_id')}: {self._describe(e)}") from None
        return _MPIJobRun(self, ns, name, recovered=True)

    # ------------------------------------------------------------ API calls

    def _describe(self, error: Exception) -> str:
        """An API call's failure in one line."""
        if isinstance(error, self._ApiException):
            return f"{error.status} {error.reason}{_hint(error.status)}"
        return f"cannot reach the API server at {self._host}: {type(error).__name__}"

    def _read(self, ns: str, name: str) -> dict[str, Any] | None:
        """The MPIJob, or None when it does not exist."""
        try:
            return self._custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                             _request_timeout=_TIMEOUT_S)
        except self._ApiException as e:
            if e.status == 404:
                return None
            raise

    def _delete(self, ns: str, name: str, grace: int | None) -> None:
        """Delete an MPIJob and what it owns (its pods, its token Secret).

        In the foreground: the MPIJob stays, being deleted, until its pods are gone, so that
        `poll` reports the end of an attempt only when none of its ranks can still write to
        the job's directory (the next attempt resumes from it).
        """
        try:
            self._custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name, grace_period_seconds=grace,
                propagation_policy="Foreground", _request_timeout=_TIMEOUT_S)
        except self._errors as e:  # the runner kills again after its grace period
            if getattr(e, "status", None) != 404:
                log.warning("kubernetes: deleting MPIJob %s/%s failed: %s", ns, name,
                            self._describe(e))

    def _delete_secret(self, ns: str, name: str, grace: int | None) -> None:
        try:
            self._core.delete_namespaced_secret(name, ns, grace_period_seconds=grace,
                                                _request_timeout=_TIMEOUT_S)
        except self._errors as e:
            if getattr(e, "status", None) != 404:
                log.warning("kubernetes: deleting Secret %s/%s failed: %s", ns, name,
                            self._describe(e))

    def _launcher_exit_code(self, ns: str, name: str) -> int | None:
        selector = (f"training.kubeflow.org/job-name={name},"
                    f"training.kubeflow.org/job-role=launcher")
        pods = self._core.list_namespaced_pod(ns, label_selector=selector,
                                              _request_timeout=_TIMEOUT_S)
        return launcher_exit_code(self._core.api_client.sanitize_for_serialization(pods))


def _hint(status: int | None) -> str:
    if status == 404:
        return " (is the MPI Operator installed, and does the namespace exist?)"
    if status == 403:
        return " (the coordinator's service account needs the Role of deploy/kubernetes)"
    return ""


def launcher_exit_code(pods: dict[str, Any]) -> int | None:
    """The exit code of an MPIJob's launcher container, from a pod list (API JSON); None
    when no launcher pod has terminated.

    The newest pod wins: with ``backoffLimit: 0`` there is one, but a pod evicted before it
    ran may be listed too.
    """
    codes = []
    for pod in pods.get("items") or []:
        created = (pod.get("metadata") or {}).get("creationTimestamp") or ""
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated")
            if terminated and isinstance(terminated.get("exitCode"), int):
                codes.append((str(created), terminated["exitCode"]))
    return max(codes)[1] if codes else None


def condition(mpijob: dict[str, Any]) -> str | None:
    """``Succeeded`` or ``Failed`` once the MPIJob has finished, else None."""
    for cond in (mpijob.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Succeeded", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


def has_run(mpijob: dict[str, Any]) -> bool:
    """Whether the MPIJob's pods have run: a true ``Running`` (or finished) condition."""
    return any(cond.get("type") in ("Running", "Succeeded", "Failed")
               and cond.get("status") == "True"
               for cond in (mpijob.get("status") or {}).get("conditions") or [])


class _MPIJobRun(RunHandle):
    """One attempt's MPIJob, known by its namespace and name."""

    def __init__(self, launcher: KubernetesLauncher, ns: str, name: str,
                 recovered: bool = False):
        self.launcher, self.ns, self.name = launcher, ns, name
        self.description = f"MPIJob {ns}/{name}" + (" (recovered)" if recovered else "")
        self._ended_by: int | None = None  # the code a deletion of ours means
        self._code: int | None = None
        self._started = False

    def started(self) -> bool:
        return self._started

    def poll(self) -> int | None:
        if self._code is not None:
            return self._code
        try:
            mpijob = self.launcher._read(self.ns, self.name)
            self._started = self._started or (mpijob is not None and has_run(mpijob))
            if mpijob is None:
                self._code = _GONE if self._ended_by is None else self._ended_by
            elif self._ended_by is not None:  # deleted by us: over when its pods are gone
                pass
            elif (state := condition(mpijob)) == "Succeeded":
                self._code = 0
            elif state == "Failed":
                code = self.launcher._launcher_exit_code(self.ns, self.name)
                self._code = 1 if not code else code
        except self.launcher._errors as e:  # the API server is away: ask again later
            log.warning("kubernetes: reading MPIJob %s/%s failed: %s", self.ns, self.name,
                        self.launcher._describe(e))
        return self._code

    def terminate(self) -> None:
        self._ended_by = self._ended_by or _TERMINATED
        self.launcher._delete(self.ns, self.name, grace=None)

    def kill(self) -> None:
        self._ended_by = _KILLED
        self.launcher._delete(self.ns, self.name, grace=0)

    def reap(self) -> None:
        # The runner has the attempt's exit: its pods have nothing more to say (their output
        # is in worker.log on the shared volume), so the MPIJob and its Secret go.
        self.launcher._delete(self.ns, self.name, grace=None)
