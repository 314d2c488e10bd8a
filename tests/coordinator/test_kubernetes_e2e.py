"""End to end through the kubernetes launcher: a real ``dptrain serve --launcher kubernetes``
process, the official ``kubernetes`` client inside it, and real ``mpiexec`` workers reporting
to it over gRPC with the token they read from the attempt's Secret.

The Kubernetes side is a FAKE: no API server nor MPI Operator can run on these machines, so the
coordinator's ``$KUBECONFIG`` points at `fake_kubernetes_api.FakeKubernetesApi` (a real HTTP
server on loopback), and `fake_kubernetes_api.FakeMpiOperator` runs each MPIJob's launcher
command here, as a pod would, and reports its end through the MPIJob's status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from jobkit import SLOW_SPEC, TINY_SPEC, ServeProcess, spec, wait_for

from dptrain.coordinator.api.records import EventKind, JobState

pytest.importorskip("kubernetes", reason="the kubernetes launcher needs the 'kubernetes' "
                                         "package (pip install 'dptrain[kubernetes]'; CI "
                                         "installs it)")
from fake_kubernetes_api import FakeKubernetesApi, FakeMpiOperator  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.e2e, pytest.mark.mpi]
NS = "ml"


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The fake API server and operator, and a kubeconfig naming them for the coordinator."""
    api = FakeKubernetesApi().start()
    operator = FakeMpiOperator(api, os.path.dirname(sys.executable), grace=10.0)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield api
    left = operator.stop()
    api.stop()
    assert not left, f"worker processes were left running: {left}"


@pytest.fixture
def coordinator(cluster, state_dir: Path, tmp_path: Path):
    serve = ServeProcess(state_dir, tmp_path / "serve.log", "--launcher", "kubernetes",
                         "--image", "registry.example.org/dptrain:test", "--namespace", NS,
                         "--slots", "2", "--heartbeat-timeout", "60")
    yield serve
    serve.stop()


def mpijob_calls(api: FakeKubernetesApi, method: str) -> list[str]:
    """The MPIJob names of the requests with `method`, in order."""
    return [r.body["metadata"]["name"] if method == "POST" else r.name
            for r in list(api.requests) if r.kind == "mpijobs" and r.method == method]


def finished(client, job_id: str, timeout: float = 240):
    return wait_for(lambda: (job := client.get_job(job_id)).state.terminal and job, timeout,
                    what=f"job {job_id} to finish")


def test_a_job_runs_to_success_as_an_mpijob(cluster, coordinator, state_dir):
    coordinator.start()
    with coordinator.client() as client:
        job = client.submit_job(TINY_SPEC)
        final = finished(client, job.id)
        events = list(client.watch_job(job.id))
        assert final.state is JobState.SUCCEEDED, final.error
        assert (final.exit_code, final.last_step) == (0, 20)
        # the workers reported over gRPC, so the token from the Secret was the job's
        reported = [e.payload["step"] for e in events
                    if getattr(e, "kind", None) is EventKind.CHECKPOINT]
        assert reported == [5, 10, 15, 20]
        assert [r.step for r in client.list_checkpoints(job.id)] == [15, 20]
    name = f"dptrain-{job.id}-1"
    assert mpijob_calls(cluster, "POST") == [name]
    # done: the MPIJob is deleted once the runner has its last lines, its Secret with it
    wait_for(lambda: cluster.get("mpijobs", NS, name) is None, 30, what="the MPIJob deleted")
    assert cluster.get("secrets", NS, name) is None
    record = json.loads((state_dir / "jobs" / job.id / "run.json").read_text())
    assert (record["launcher"], record["mpijob"], record["namespace"]) == (
        "kubernetes", name, NS)
    log = (state_dir / "jobs" / job.id / "worker.log").read_text()
    assert f"[dptrain] created MPIJob {NS}/{name}: 2 rank(s) on 2 worker pod(s) of " \
           f"registry.example.org/dptrain:test" in log


def test_a_diverged_job_fails_with_the_launcher_pods_exit_code(cluster, coordinator):
    coordinator.start()
    with coordinator.client() as client:
        job = client.submit_job(spec(TINY_SPEC, optimizer={"name": "sgd", "lr": 1e30},
                                     workers=1))
        final = finished(client, job.id)
    # exit 3 (diverged) read from the launcher pod: no restart, as with mpiexec
    assert (final.state, final.exit_code, final.restarts) == (JobState.FAILED, 3, 0)
    assert "non-finite loss" in final.error
    assert mpijob_calls(cluster, "POST") == [f"dptrain-{job.id}-1"]


def test_cancel_deletes_the_mpijob(cluster, coordinator):
    coordinator.start()
    with coordinator.client() as client:
        job = client.submit_job(spec(SLOW_SPEC, max_steps=100000))
        wait_for(lambda: client.list_checkpoints(job.id), 120, what="a first checkpoint")
        client.cancel_job(job.id)
        final = finished(client, job.id)
    assert final.state is JobState.CANCELLED
    name = f"dptrain-{job.id}-1"
    assert mpijob_calls(cluster, "DELETE")[:1] == [name]
    # deleted in the foreground: it goes when its "pods" (the ranks) have ended
    wait_for(lambda: cluster.get("mpijobs", NS, name) is None, 60, what="the MPIJob gone")
    assert cluster.get("secrets", NS, name) is None


def test_after_a_kill9_the_coordinator_finds_its_mpijob_and_resumes(cluster, coordinator):
    coordinator.start()
    with coordinator.client() as client:
        job = client.submit_job(spec(SLOW_SPEC, max_steps=400))
        wait_for(lambda: client.list_checkpoints(job.id), 120, what="a first checkpoint")
    coordinator.kill()  # the MPIJob and its pods go on without it
    first = f"dptrain-{job.id}-1"
    assert cluster.get("mpijobs", NS, first) is not None
    coordinator.start()
    with coordinator.client() as client:
        final = finished(client, job.id)
        lines = [e.payload.get("line", "") for e in client.watch_job(job.id)
                 if getattr(e, "kind", None) is EventKind.LOG]
    assert final.state is JobState.SUCCEEDED, final.error
    assert (final.last_step, final.restarts) == (400, 0)
    assert any("the coordinator restarted and found this job's workers still running" in line
               for line in lines)
    # found by the name in run.json, deleted, and the job resumed in the attempt's successor
    assert mpijob_calls(cluster, "DELETE")[0] == first
    assert mpijob_calls(cluster, "POST") == [first, f"dptrain-{job.id}-2"]
