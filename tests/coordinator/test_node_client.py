"""A client in another language: Node.js with grpc-js, its stubs loaded at run time from the
.proto files ``dptrain proto-path`` names, submits a job file as it is (``spec_text``) to a REAL
coordinator on loopback and lists the services over server reflection, v1 and v1alpha, with the
reflection protos grpc-js's own ``@grpc/reflection`` ships (`node_client/client.cjs`).

The npm packages (pinned in `node_client/package.json`) are installed once into a cache
directory; without ``node``/``npm`` (``apt-get install nodejs npm``; CI installs them) or the
npm registry, the test skips and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dptrain.coordinator.server.scheduler import Cluster

HERE = Path(__file__).parent / "node_client"
DPTRAIN = str(Path(sys.executable).parent / "dptrain")
JOB = """\
name: from-node
model: {name: mlp, args: {in_features: 64, hidden: [16], num_classes: 10}}
dataset: {name: digits}
optimizer: {name: sgd, lr: 0.05}
batch_size: 16
max_steps: 5
workers: 2
"""

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The client's npm packages, installed once per package.json into the user's cache."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (apt-get install nodejs npm; CI does)")
    manifest = (HERE / "package.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "dptrain-tests" / f"node-client-{hashlib.sha256(manifest).hexdigest()[:12]}"
    if not (target / "node_modules" / "@grpc" / "reflection").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        (target / "package.json").write_bytes(manifest)
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix",
                                 str(target)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"npm install of the grpc-js client failed (is the npm registry "
                        f"reachable?): {result.stderr.strip().splitlines()[-1:]}")
    return target / "node_modules"


def test_a_node_grpc_js_client_submits_a_job_file_as_text_and_reflects(
        node_modules, serve_coordinator, tmp_path):
    server = serve_coordinator(cluster=Cluster.local(2))
    token_file, job_file = tmp_path / "token", tmp_path / "job.yaml"
    token_file.write_text(server.token + "\n")  # as an editor leaves it
    job_file.write_text(JOB)
    proto_path = subprocess.run([DPTRAIN, "proto-path"], capture_output=True, text=True,
                                timeout=60, check=True).stdout.strip()
    result = subprocess.run(
        ["node", str(HERE / "client.cjs"), server.address, str(token_file), proto_path,
         str(job_file)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "NODE_PATH": str(node_modules)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    services = ["dptrain.v1.Coordinator", "dptrain.v1.WorkerService", "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]
    assert out["v1"] == services and out["v1alpha"] == services
    job = out["job"]
    assert (job["name"], job["state"], job["priority"]) == ("from-node", "QUEUED", "2")
    stored = server.store.get_job(job["id"])
    assert stored.spec["optimizer"]["lr"] == 0.05 and stored.spec["workers"] == 2
    assert stored.spec["model"]["args"] == {"in_features": 64, "hidden": [16], "num_classes": 10}
    # The same message a Python client gets for the same bad field.
    assert out["refused"] == {"code": "INVALID_ARGUMENT",
                              "details": "optimizer.lr: must be a finite number >= 0, got -0.1"}
    assert sum(server.store.count_by_state().values()) == 1
