"""What code a job may run, through a REAL coordinator on loopback: references outside the
job's shipped code, the zoo and ``--allow-module`` are INVALID_ARGUMENT at submission, store
nothing and are never imported by the coordinator; a job stored under a longer list is refused
by its workers at its next launch, before they import it."""

from __future__ import annotations

import os
import sys

import grpc
import pytest
import yaml
from jobkit import (
    DPTRAIN,
    TINY_SPEC,
    ServeProcess,
    descendants,
    kill_all,
    run_cli,
    spec,
    wait_for,
)

from dptrain.coordinator.api.credentials import bearer_metadata
from dptrain.coordinator.api.records import JobState
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.server.runner import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import ServerConfigError
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc

RULE = ("must name the job's shipped code ({shipped}), a model of the zoo, or a module under "
        "a prefix this coordinator allows ({allowed}); an admin allows installed modules with "
        "`dptrain serve --allow-module PREFIX`")

#: Importing it leaves a marker file, a line per importing process (its command line):
#: whoever imports it runs the job's code.
TRIPWIRE = ("import sys\nwith open({marker!r}, 'a') as f:\n"
            "    f.write(' '.join(sys.argv) + '\\n')\n\n"
            "def build(**kwargs):\n    raise SystemExit('ran')\n")


@pytest.fixture
def tripwire(tmp_path, monkeypatch):
    """Module `mylab_tripwire`, importable here and in children; returns its marker file."""
    folder, marker = tmp_path / "site", tmp_path / "imported"
    folder.mkdir()
    (folder / "mylab_tripwire.py").write_text(TRIPWIRE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return marker


def _stored(server) -> int:
    return sum(server.store.count_by_state().values())


@pytest.mark.parametrize("field, reference", [
    ("model", "os:system"), ("model", "subprocess:run"), ("dataset", "builtins:eval"),
    ("loss", "importlib:import_module"), ("model", "mylab_tripwire:build"),
    ("model", "dptrain.coordinator.server.server:serve"),
])
def test_a_reference_outside_the_rule_is_refused_storing_nothing(serve_coordinator, tripwire,
                                                                  field, reference):
    server = serve_coordinator(cluster=Cluster.local(2))
    job = spec()
    if field == "loss":
        job["loss"] = reference
    else:
        job[field] = {"name": reference, "args": {"command": "id > f"}}
    path = f"{field}.name" if field != "loss" else "loss"
    with Client(server.address, token=server.token, timeout=30) as client, \
            pytest.raises(ClientError) as info:
        client.submit_job(job)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.details == (f"{path}: {RULE.format(shipped='none', allowed='none')}, "
                                  f"got {reference!r}")
    assert _stored(server) == 0 and list(server.blobs) == []
    # The coordinator decided from the strings: it imported nothing the job names.
    assert "mylab_tripwire" not in sys.modules and not tripwire.exists()


def test_an_allowed_prefix_passes_and_its_near_miss_does_not(serve_coordinator, tripwire):
    server = serve_coordinator(cluster=Cluster.local(2), allowed_modules=["mylab_tripwire"])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)

        def submit(reference):
            message = pb.JobSpec(name="j", model=pb.ModelSpec(name=reference, args_json="{}"),
                                 dataset=pb.DatasetSpec(name="digits", args_json="{}"),
                                 optimizer=pb.OptimizerSpec(name="sgd", lr=0.1), batch_size=8,
                                 max_steps=1, workers=1)
            return stub.SubmitJob(pb.SubmitJobRequest(spec=message),
                                  metadata=bearer_metadata(server.token), timeout=30)

        assert submit("mylab_tripwire:build").state == pb.QUEUED
        assert submit("mylab_tripwire.sub:build").state == pb.QUEUED
        with pytest.raises(grpc.RpcError) as info:
            submit("mylab_tripwirex:build")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("model.name: " + RULE.format(
        shipped="none", allowed="mylab_tripwire") + ", got 'mylab_tripwirex:build'")
    assert _stored(server) == 2
    assert "mylab_tripwire" not in sys.modules and not tripwire.exists()  # queued, not run


def test_shipped_code_may_be_named_and_nothing_else_beside_it(serve_coordinator, tmp_path):
    server = serve_coordinator(cluster=Cluster.local(2))
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text("raise SystemExit('never imported here')\n")
    (project / "os.py").write_text("")  # a rank's `import os` is the standard library's
    job = spec(model={"name": "mymodels:build"}, code=".")
    (project / "job.yaml").write_text(yaml.safe_dump(job))
    with Client(server.address, token=server.token, timeout=30) as client:
        assert client.submit_job(project / "job.yaml").state is JobState.QUEUED
        (project / "job.yaml").write_text(yaml.safe_dump(
            {**job, "loss": "os:system"}))
        with pytest.raises(ClientError) as info:
            client.submit_job(project / "job.yaml")
    assert info.value.details == (f"loss: {RULE.format(shipped='mymodels', allowed='none')}, "
                                  "got 'os:system'")
    assert _stored(server) == 1 and "mymodels" not in sys.modules


def test_a_bad_prefix_stops_the_server_before_it_starts(serve_coordinator):
    with pytest.raises(ServerConfigError, match=r"^--allow-module: must be a module prefix "):
        serve_coordinator(allowed_modules=["my-lab"])


def test_serve_allow_module_on_the_command_line(tmp_path, tripwire):
    serve = ServeProcess(tmp_path / "state", tmp_path / "serve.log",
                         "--allow-module", "mylab_tripwire", "--allow-module", "other.lab")
    serve.start()
    try:
        (tmp_path / "ok.yaml").write_text(yaml.safe_dump(
            spec(model={"name": "mylab_tripwire:build"})))
        (tmp_path / "no.yaml").write_text(yaml.safe_dump(
            spec(model={"name": "other:build"})))
        ok = run_cli(serve.address, tmp_path / "state", "submit", str(tmp_path / "ok.yaml"))
        no = run_cli(serve.address, tmp_path / "state", "submit", str(tmp_path / "no.yaml"))
    finally:
        serve.stop()
    assert ok.returncode == 0 and ok.stdout.startswith("j-"), ok.stderr
    assert no.returncode != 0
    assert ("model.name: " + RULE.format(shipped="none", allowed="mylab_tripwire, other.lab")
            + ", got 'other:build'") in no.stderr
    # Neither the coordinator nor the CLI imported it; the allowed job's ranks may have, if
    # its launch came before the server stopped.
    importers = tripwire.read_text().splitlines() if tripwire.exists() else []
    assert not [line for line in importers if line.split()[0] == DPTRAIN], importers


@pytest.mark.e2e
@pytest.mark.mpi
def test_a_job_stored_under_a_longer_list_is_refused_at_its_next_launch(serve_coordinator,
                                                                       tripwire, tmp_path):
    # Stored while mylab_tripwire was allowed (no runner: it stays QUEUED) ...
    first = serve_coordinator(cluster=Cluster.local(1), allowed_modules=["mylab_tripwire"])
    with Client(first.address, token=first.token, timeout=30) as client:
        job = client.submit_job(spec(TINY_SPEC, model={"name": "mylab_tripwire:build"},
                                     workers=1), max_restarts=3)
    first.stop(grace=0)
    # ... launched by a coordinator that allows nothing: its rank refuses before importing.
    second = serve_coordinator(cluster=Cluster.local(1),
                               runner=RunnerSettings(tmp_path / "state", heartbeat_timeout=60.0,
                                                     kill_grace=5.0, poll_interval=0.1))
    try:
        with Client(second.address, token=second.token, timeout=30) as client:
            done = wait_for(lambda: (j := client.get_job(job.id)).state.terminal and j, 120,
                            what="the job to end")
    finally:
        second.stop(grace=1.0)
        kill_all(descendants(os.getpid()))
    assert done.state is JobState.FAILED and done.exit_code == 2 and done.restarts == 0
    assert ("model.name: " + RULE.format(shipped="none", allowed="none")) in done.error
    assert not tripwire.exists()  # refused, not run
