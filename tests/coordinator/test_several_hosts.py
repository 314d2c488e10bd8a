"""Several hosts, for real: each host is a network namespace with its own hostname, joined to
this one by a veth pair on a bridge (`netns.HostNetwork`). Hydra reaches the hosts through
``--launcher-exec netns-exec`` as it would through ssh, the ranks talk over TCP across the veth
pairs, and the coordinator listens with TLS on the bridge's address.

Needs root and iproute2: elsewhere these tests skip, saying so; CI installs iproute2 and runs
them as root (``.ci/run``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from jobkit import DPTRAIN, FAULTY_MODEL, TINY_SPEC, spec, tensor_digests, wait_for
from netns import NETNS_EXEC, HostNetwork, unavailable
from repo import REPO

import dptrain
from dptrain.coordinator.api.records import Event, EventKind, JobState
from dptrain.coordinator.client import Client
from dptrain.coordinator.server.launchers.base import LaunchError
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher
from dptrain.coordinator.server.launchers.preflight import (
    HostCheck,
    check_script,
    preflight_commands,
    run_preflight,
)
from dptrain.coordinator.server.runner_settings import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.tls_init import init_tls

pytestmark = [pytest.mark.mpi, pytest.mark.e2e]

# TINY_SPEC's digits MLP: 64*32 + 32 + 32*10 + 10 float32 parameters, allreduced every step.
GRADIENT_BYTES = (64 * 32 + 32 + 32 * 10 + 10) * 4
STEPS = TINY_SPEC["max_steps"]


@pytest.fixture(scope="module")
def hosts():
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"several-hosts tests: {reason}")
    net = HostNetwork.create(2)
    yield net
    net.remove()


def _env(hosts: HostNetwork, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")}
    return {**env, **hosts.environment(), **more}


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([DPTRAIN, "run", *args, "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_each_host_has_its_own_name_and_address(hosts):
    for i, host in enumerate(hosts.hosts):
        seen = hosts.run_in(host, "hostname; ip -4 -o addr show dev eth0")
        assert seen.returncode == 0, seen.stderr
        name, address = seen.stdout.splitlines()
        assert name == host
        assert f" {hosts.subnet.network_address + 2 + i}/24 " in address


def test_two_hosts_train_bit_identically_to_two_local_ranks(hosts, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec()))
    hostfile = hosts.hostfile(tmp_path / "hosts")
    before = hosts.veth_bytes()
    remote = _run(str(job), "-n", "2", "--hostfile", str(hostfile), "--launcher-exec",
                  NETNS_EXEC, "--checkpoint-dir", str(tmp_path / "remote"), env=_env(hosts))
    moved = hosts.veth_bytes() - before
    assert remote.returncode == 0, remote.stderr
    local = _run(str(job), "-n", "2", "--checkpoint-dir", str(tmp_path / "local"),
                 env=_env(hosts))
    assert local.returncode == 0, local.stderr
    final = f"step-{STEPS:08d}/model.safetensors"
    assert tensor_digests(tmp_path / "remote" / final) == tensor_digests(
        tmp_path / "local" / final)
    # Every step's gradients crossed between the hosts: each of the 2 ranks sends at least
    # half of them to the other, and the bridge's side of the veth pairs counts each byte
    # once as it leaves one host and once as it reaches the other.
    assert moved >= 2 * STEPS * GRADIENT_BYTES


def test_a_rank_raising_on_the_second_host_aborts_the_job(hosts, tmp_path):
    (tmp_path / "faulty.py").write_text(FAULTY_MODEL)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec(
        model={"name": "faulty:build", "args": {"mode": "raise", "rank": 1, "step": 3}},
        dataset={"name": "synthetic", "args": {"n": 512, "features": 32, "classes": 5},
                 "validation_fraction": 0.125})))
    result = _run(str(job), "-n", "2", "--hostfile", str(hosts.hostfile(tmp_path / "hosts")),
                  "--launcher-exec", NETNS_EXEC,
                  env=_env(hosts, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}"))
    assert result.returncode == 1, result.stderr
    assert ("dptrain worker: rank 1 of 2 failed: RuntimeError: injected failure at step 3"
            in result.stderr.splitlines())
    # Ended by MPI_Abort from the failing rank, not by anything timing out.
    assert "application called MPI_Abort(MPI_COMM_WORLD, 1)" in result.stderr
    assert result.stdout == ""


def test_the_coordinator_on_the_bridge_with_tls_runs_a_job_on_both_hosts(
        hosts, tmp_path, serve_coordinator):
    tls = init_tls(tmp_path / "tls", [hosts.address])
    server = serve_coordinator(
        host=hosts.address, port=0, tls_cert=tls.cert, tls_key=tls.key, tls_ca=tls.ca,
        cluster=Cluster.from_hostfile(hosts.hostfile(tmp_path / "hosts")),
        runner=RunnerSettings(tmp_path / "unused", heartbeat_timeout=None,
                              launcher=MpiexecLauncher(launcher_exec=NETNS_EXEC),
                              extra_env=hosts.environment()))
    assert server.address == f"{hosts.address}:{server.port}"
    with Client(server.address, token=server.token, tls_ca=tls.ca) as client:
        job = client.submit_job(spec())
        done = wait_for(lambda: (j := client.get_job(job.id)).state.terminal and j, 300)
        events = [e for e in client.watch_job(job.id) if isinstance(e, Event)]
        assert done.state is JobState.SUCCEEDED, done.error
        where = ",".join(f"{h}:1" for h in hosts.hosts)
        log = server.runner.settings.job_paths(job.id).log.read_text()
        assert f"2 rank(s) on {where}" in log.splitlines()[0]
        lines = [e.payload["line"] for e in events if e.kind is EventKind.LOG]
        # Rank 0 ran in a namespace: what it reported reached the bridge's address over TLS.
        metrics = [e.payload["step"] for e in events if e.kind is EventKind.METRICS]
        assert metrics and max(metrics) == STEPS
        uploaded = [e.payload["step"] for e in events if e.kind is EventKind.CHECKPOINT]
        assert STEPS in uploaded
        assert not any("had not uploaded it" in line for line in lines)
        assert [c.step for c in client.list_checkpoints(job.id)][-1] == STEPS


def test_the_preflight_names_an_unreachable_host(hosts, tmp_path, serve_coordinator):
    missing = f"{hosts.tag}gone"  # no such namespace: the remote shell cannot enter it
    hostfile = hosts.hostfile(tmp_path / "hosts", extra=(f"{missing}:1",))
    server = serve_coordinator(
        port=0, cluster=Cluster.from_hostfile(hostfile),
        runner=RunnerSettings(tmp_path / "unused", launcher=MpiexecLauncher(
            launcher_exec=NETNS_EXEC), extra_env=hosts.environment()))
    with Client(server.address, token=server.token) as client:
        job = client.submit_job({**spec(), "workers": 3, "batch_size": 48})
        done = wait_for(lambda: (j := client.get_job(job.id)).state.terminal and j, 300)
    assert done.state is JobState.FAILED and done.restarts == 0
    assert done.error == (f"preflight: host {missing}: unreachable through {NETNS_EXEC} (exit "
                          f'code 255): Cannot open network namespace "{missing}": No such file '
                          f"or directory")
    log = server.runner.settings.job_paths(job.id).log
    assert not log.exists() or "==== dptrain: attempt" not in log.read_text()

    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**spec(), "workers": 3, "batch_size": 48}))
    result = _run(str(job_file), "--hostfile", str(hostfile), "--launcher-exec", NETNS_EXEC,
                  env=_env(hosts))
    assert result.returncode == 2
    assert result.stderr == f"dptrain: error: {done.error}\n"


def test_the_preflight_names_a_missing_venv_path_and_another_version(hosts, tmp_path):
    placement = ((hosts.hosts[0], 1), ("localhost", 1), (hosts.hosts[1], 1))
    python = sys.executable
    checks = preflight_commands(placement, python="/opt/none/bin/python", paths=[tmp_path],
                                launcher_exec=NETNS_EXEC)
    assert [c.host for c in checks] == [hosts.hosts[0], hosts.hosts[1]]  # localhost: no shell
    with pytest.raises(LaunchError) as info:
        run_preflight(checks)
    assert str(info.value) == (f"preflight: host {hosts.hosts[0]}: no Python at "
                               f"/opt/none/bin/python (the same virtual environment must be "
                               f"at the same path on every host) (and 1 more host(s))")
    with pytest.raises(LaunchError, match=f"host {hosts.hosts[0]}: no {tmp_path}/gone there"):
        run_preflight(preflight_commands(placement, python=python, paths=[tmp_path / "gone"],
                                         launcher_exec=NETNS_EXEC))
    other = check_script(python, [], version="0.0.1.dev0")
    with pytest.raises(LaunchError) as info:
        run_preflight([HostCheck(hosts.hosts[1], (NETNS_EXEC, "-x", hosts.hosts[1], other))])
    assert str(info.value) == (f"preflight: host {hosts.hosts[1]}: dptrain "
                               f"{dptrain.__version__} there, 0.0.1.dev0 here")
    run_preflight(preflight_commands(placement, python=python, paths=[tmp_path],
                                     launcher_exec=NETNS_EXEC))
