"""A FAKE of the few Kubernetes API endpoints the kubernetes launcher calls: a real HTTP server
on loopback that the official ``kubernetes`` client talks to, keeping objects in a dict.

It is a test double, used because no Kubernetes API server (nor the MPI Operator) can run on
these machines: it validates nothing, runs no pods and no controller. A test plays the
operator's part by setting an MPIJob's status (`FakeKubernetesApi.set_condition`) and adding
its launcher pod (`FakeKubernetesApi.add_launcher_pod`).

Endpoints: Secrets (create, patch metadata, delete), MPIJobs (create, get, delete; a delete
also removes the Secrets the MPIJob owns, as Kubernetes' garbage collector would; with an
`on_deleted` hook, a foreground delete keeps the MPIJob until `finish_deletion`, as its pods
would) and pods (list by label selector). Every request is recorded in `FakeKubernetesApi.requests`.

`FakeMpiOperator` goes further for end-to-end tests: it runs each created MPIJob's launcher
command as a local process, as the operator and the kubelet would run it in a pod.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jobkit import kill_all, processes_with_env

__all__ = ["FakeKubernetesApi", "FakeMpiOperator", "Request", "IMAGE_BIN"]

#: Where the image's virtual environment has its programs (deploy/Dockerfile).
IMAGE_BIN = "/opt/dptrain/bin/"

_ROUTES = [
    ("secrets", re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets(?:/(?P<name>[^/]+))?$")),
    ("pods", re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+))?$")),
    ("mpijobs", re.compile(r"^/apis/kubeflow\.org/v2beta1/namespaces/(?P<ns>[^/]+)/mpijobs"
                           r"(?:/(?P<name>[^/]+))?$")),
]


@dataclass(frozen=True)
class Request:
    """One request the fake received."""

    method: str
    kind: str
    namespace: str
    name: str | None
    query: dict[str, list[str]]
    body: Any


@dataclass
class FakeKubernetesApi:
    """The fake's state; `start` serves it on 127.0.0.1 (see the module docstring)."""

    mpijob_crd: bool = True  # False: as if the MPI Operator were not installed (404s)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    #: Called (outside the lock) with each MPIJob created, and with each deleted and the
    #: delete's grace period in seconds (None: the pods' own).
    on_created: Callable[[dict[str, Any]], None] | None = None
    on_deleted: Callable[[dict[str, Any], int | None], None] | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKubernetesApi:
        """Serve on a free loopback port, in a daemon thread."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output quiet
                pass

            def _handle(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` pointing at the fake."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return configuration

    # ------------------------------------------------------------ playing the operator

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A stored object, or None."""
        with self.lock:
            return self.objects.get((kind, namespace, name))

    def set_condition(self, namespace: str, name: str, kind: str) -> None:
        """Add a true status condition (``Running``, ``Succeeded``, ``Failed``) to an MPIJob."""
        with self.lock:
            job = self.objects[("mpijobs", namespace, name)]
            job.setdefault("status", {}).setdefault("conditions", []).append(
                {"type": kind, "status": "True", "reason": f"MPIJob{kind}"})

    def add_launcher_pod(self, namespace: str, mpijob: str, exit_code: int) -> None:
        """Add the MPIJob's launcher pod, terminated with `exit_code`."""
        name = f"{mpijob}-launcher-abcde"
        with self.lock:
            self.objects[("pods", namespace, name)] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace,
                             "creationTimestamp": "2026-01-01T00:00:00Z",
                             "labels": {"training.kubeflow.org/job-name": mpijob,
                                        "training.kubeflow.org/job-role": "launcher"}},
                "status": {"containerStatuses": [{
                    "name": "launcher", "image": "img", "imageID": "", "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]}}

    # ------------------------------------------------------------ the HTTP surface

    def _serve(self, http: BaseHTTPRequestHandler) -> None:
        url = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        kind, match = next(((kind, m) for kind, pattern in _ROUTES
                            if (m := pattern.match(url.path))), ("", None))
        if match is None or kind == "mpijobs" and not self.mpijob_crd:
            return self._reply(http, 404, _status(404, "NotFound", url.path))
        ns, name = match["ns"], match["name"]
        query = parse_qs(url.query)
        with self.lock:
            self.requests.append(Request(http.command, kind, ns, name, query, body))
            code, reply = self._act(http.command, kind, ns, name, query, body)
        if kind == "mpijobs" and code < 300:
            if http.command == "POST" and self.on_created is not None:
                self.on_created(reply)
            if http.command == "DELETE" and self.on_deleted is not None:
                grace = (query.get("gracePeriodSeconds") or [None])[0]
                self.on_deleted({"metadata": {"name": name, "namespace": ns}},
                                None if grace is None else int(grace))
        self._reply(http, code, reply)


    def _act(self, method: str, kind: str, ns: str, name: str | None,
             query: dict[str, list[str]], body: Any) -> tuple[int, dict[str, Any]]:
        if method == "POST" and name is None:
            name = body["metadata"]["name"]
            if (kind, ns, name) in self.objects:
                return 409, _status(409, "AlreadyExists", f"{kind} {name!r} already exists")
            stored = json.loads(json.dumps(body))
            stored["metadata"].update(uid=str(uuid.uuid4()), namespace=ns)
            self.objects[(kind, ns, name)] = stored
            return 201, stored
        if method == "GET" and name is None:
            wanted = dict(term.split("=", 1) for term in
                          (query.get("labelSelector") or [""])[0].split(",") if term)
            items = [obj for (k, n, _), obj in sorted(self.objects.items())
                     if k == kind and n == ns and wanted.items()
                     <= (obj["metadata"].get("labels") or {}).items()]
            return 200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}
        obj = self.objects.get((kind, ns, name))
        if obj is None:
            return 404, _status(404, "NotFound", f"{kind} {name!r} not found")
        if method == "GET":
            return 200, obj
        if method == "PATCH":
            obj["metadata"].update(body.get("metadata") or {})
            return 200, obj
        if method == "DELETE":
            foreground = query.get("propagationPolicy") == ["Foreground"]
            if kind == "mpijobs" and foreground and self.on_deleted is not None:
                # its "pods" are the operator's processes: it stays until they are gone
                obj["metadata"].setdefault("deletionTimestamp", "2026-01-01T00:00:00Z")
                return 200, obj
            self._remove(kind, ns, name)
            return 200, _status(200, "Success", "deleted")
        return 405, _status(405, "MethodNotAllowed", method)

    def _remove(self, kind: str, ns: str, name: str) -> None:
        """Delete an object and what it owns (the garbage collector's part). Lock held."""
        obj = self.objects.pop((kind, ns, name), None)
        if obj is None:
            return
        uid = obj["metadata"].get("uid")
        for key, other in list(self.objects.items()):
            owners = other["metadata"].get("ownerReferences") or []
            if any(owner.get("uid") == uid for owner in owners):
                del self.objects[key]

    def finish_deletion(self, namespace: str, name: str) -> None:
        """An MPIJob deleted in the foreground goes, its pods being gone."""
        with self.lock:
            obj = self.objects.get(("mpijobs", namespace, name))
            if obj is not None and "deletionTimestamp" in obj["metadata"]:
                self._remove("mpijobs", namespace, name)

    @staticmethod
    def _reply(http: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        http.send_response(code)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "code": code, "reason": reason,
            "message": message, "status": "Success" if code < 300 else "Failure"}


class FakeMpiOperator:
    """Plays the MPI Operator and the kubelet for `FakeKubernetesApi` (a test double: no
    operator can run here). When an MPIJob is created it runs the MPIJob's launcher command as
    a local process — the image's programs (`IMAGE_BIN`) replaced by those in `bin_dir`, the
    environment the container's (a ``secretKeyRef`` read from the stored Secret) over this
    process's — and marks the MPIJob Running; when that process exits, Succeeded or Failed,
    with a launcher pod holding its exit code. Hydra then starts every rank on this machine,
    where in a cluster it would reach the worker pods over ssh.

    Deleting the MPIJob ends the process as deleting its pods would: SIGTERM to the
    launcher's first process (``mpiexec``), then, after the grace period (`grace`, or the
    delete's), SIGKILL to every process of the attempt (found by ``DPTRAIN_RUN_ID``).
    """

    def __init__(self, api: FakeKubernetesApi, bin_dir: str, grace: float = 10.0):
        self.api, self.bin_dir, self.grace = api, bin_dir.rstrip("/") + "/", grace
        self.runs: dict[tuple[str, str], tuple[subprocess.Popen, str]] = {}
        self.lock = threading.Lock()
        api.on_created, api.on_deleted = self._created, self._deleted

    def _created(self, mpijob: dict[str, Any]) -> None:
        ns, name = mpijob["metadata"]["namespace"], mpijob["metadata"]["name"]
        (container,) = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"][
            "containers"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")}
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
            else:
                ref = variable["valueFrom"]["secretKeyRef"]
                secret = self.api.get("secrets", ns, ref["name"])
                env[variable["name"]] = secret["stringData"][ref["key"]]
        command = [self.bin_dir + arg[len(IMAGE_BIN):] if arg.startswith(IMAGE_BIN) else arg
                   for arg in container["command"]]
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        with self.lock:
            self.runs[(ns, name)] = (proc, env.get("DPTRAIN_RUN_ID", ""))
        self.api.set_condition(ns, name, "Running")
        threading.Thread(target=self._wait, args=(ns, name, proc), daemon=True).start()

    def _wait(self, ns: str, name: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self.api.lock:
            mpijob = self.api.objects.get(("mpijobs", ns, name))
            deleting = mpijob is not None and "deletionTimestamp" in mpijob["metadata"]
        if mpijob is None or deleting:  # deleted meanwhile: its "pod" is gone now
            _, run_id = self.runs[(ns, name)]
            self._kill(proc, run_id)  # the rest of the pod's processes, as the kubelet would
            self.api.finish_deletion(ns, name)
            return
        self.api.add_launcher_pod(ns, name, code if code >= 0 else 128 - code)
        self.api.set_condition(ns, name, "Succeeded" if code == 0 else "Failed")

    def _deleted(self, mpijob: dict[str, Any], grace: int | None) -> None:
        key = (mpijob["metadata"]["namespace"], mpijob["metadata"]["name"])
        with self.lock:
            run = self.runs.get(key)
        if run is None:
            self.api.finish_deletion(*key)
            return
        proc, run_id = run
        if proc.poll() is not None:  # its "pod" had finished already
            self.api.finish_deletion(*key)
            return
        if grace != 0:
            proc.send_signal(signal.SIGTERM)
        timer = threading.Timer(self.grace if grace is None else grace, self._kill, (proc, run_id))
        timer.daemon = True
        timer.start()

    def _kill(self, proc: subprocess.Popen, run_id: str) -> None:
        kill_all(processes_with_env(run_id) + ([proc.pid] if proc.poll() is None else []))

    def stop(self) -> list[int]:
        """End every process left, as a cluster's teardown; returns the pids that were left."""
        with self.lock:
            runs = list(self.runs.values())
        left = []
        for proc, run_id in runs:
            left += processes_with_env(run_id)
            self._kill(proc, run_id)
            proc.wait()
        return left
