"""A FAKE of the few Kubernetes API endpoints the kubernetes launcher calls: a real HTTP server
on loopback that the official ``kubernetes`` client talks to, keeping objects in a dict.

It is a test double, used because no Kubernetes API server (nor the MPI Operator) can run on
these machines: it validates nothing, runs no pods and no controller. A test plays the
operator's part by setting an MPIJob's status (`FakeKubernetesApi.set_condition`) and adding
its launcher pod (`FakeKubernetesApi.add_launcher_pod`).

Endpoints: Secrets (create, patch metadata, delete), MPIJobs (create, get, delete; a delete
also removes the Secrets the MPIJob owns, as Kubernetes' garbage collector would) and pods
(list by label selector). Every request is recorded in `FakeKubernetesApi.requests`.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["FakeKubernetesApi", "Request"]

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
            del self.objects[(kind, ns, name)]
            uid = obj["metadata"]["uid"]
            for key, other in list(self.objects.items()):  # the garbage collector's part
                owners = other["metadata"].get("ownerReferences") or []
                if any(owner.get("uid") == uid for owner in owners):
                    del self.objects[key]
            return 200, _status(200, "Success", "deleted")
        return 405, _status(405, "MethodNotAllowed", method)

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
