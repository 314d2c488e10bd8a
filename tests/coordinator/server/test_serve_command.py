"""``dptrain serve`` with a hostfile: it warns, in one line, when it schedules on other hosts
while listening where only this machine can reach it."""

from __future__ import annotations

from jobkit import ServeProcess

from dptrain.coordinator.server.command import unreachable_note
from dptrain.coordinator.server.scheduler import Cluster, Host


def test_a_loopback_coordinator_with_remote_hosts_warns_once(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:2\nnode1 slots=4\nnode2\n")
    serve = ServeProcess(tmp_path / "state", tmp_path / "serve.log", "--hostfile", str(hostfile))
    serve.start()
    serve.stop()
    warnings = [line for line in serve.log.read_text().splitlines() if "warning" in line]
    assert warnings == [
        "dptrain coordinator: warning: the hostfile names other hosts (node1, node2) but the "
        "coordinator listens on 127.0.0.1, which their ranks cannot reach: give --host (with "
        "--tls-cert/--tls-key, see dptrain tls init) or the workers report nothing"]


def test_no_warning_when_the_workers_can_reach_it():
    remote = Cluster((Host("localhost", 2), Host("node1", 2)))
    assert unreachable_note(Cluster.local(2), "127.0.0.1", None) is None
    assert unreachable_note(remote, "10.0.0.5", None) is None
    assert unreachable_note(remote, "127.0.0.1", "coord.example.org:50051") is None
    assert unreachable_note(remote, "localhost", None) is not None
