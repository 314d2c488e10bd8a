"""``dptrain serve``'s warnings, one line each: when it schedules on other hosts while listening
where only this machine can reach it, and when it runs as root (so would every job's code)."""

from __future__ import annotations

import os

import pytest
from jobkit import ServeProcess

from dptrain.coordinator.server.command import root_note, unreachable_note
from dptrain.coordinator.server.scheduler import Cluster, Host


def test_a_loopback_coordinator_with_remote_hosts_warns_once(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:2\nnode1 slots=4\nnode2\n")
    serve = ServeProcess(tmp_path / "state", tmp_path / "serve.log", "--hostfile", str(hostfile))
    serve.start()
    serve.stop()
    warnings = [line for line in serve.log.read_text().splitlines() if "warning" in line]
    assert [w for w in warnings if w != ROOT_WARNING] == [
        "dptrain coordinator: warning: the hostfile names other hosts (node1, node2) but the "
        "coordinator listens on 127.0.0.1, which their ranks cannot reach: give --host (with "
        "--tls-cert/--tls-key, see dptrain tls init) or the workers report nothing"]


ROOT_WARNING = ("dptrain coordinator: warning: running as root, so jobs' code runs as root on "
                "the workers it starts; run the coordinator as an unprivileged user "
                "(docs/deploy.md)")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: dptrain serve started as root")
def test_serve_as_root_warns_once_that_jobs_run_as_root(tmp_path):
    serve = ServeProcess(tmp_path / "state", tmp_path / "serve.log")
    serve.start()
    serve.stop()
    lines = serve.log.read_text().splitlines()
    assert [line for line in lines if "warning" in line] == [ROOT_WARNING]
    # The quick start works as it is: it serves (start() waited for SERVING) and says where.
    assert any(line.startswith("dptrain coordinator listening on") for line in lines)


def test_only_root_is_warned_about():
    assert root_note(0) == ROOT_WARNING.removeprefix("dptrain coordinator: warning: ")
    assert root_note(1000) is None and root_note(65534) is None


def test_no_warning_when_the_workers_can_reach_it():
    remote = Cluster((Host("localhost", 2), Host("node1", 2)))
    assert unreachable_note(Cluster.local(2), "127.0.0.1", None) is None
    assert unreachable_note(remote, "10.0.0.5", None) is None
    assert unreachable_note(remote, "127.0.0.1", "coord.example.org:50051") is None
    assert unreachable_note(remote, "localhost", None) is not None
