"""The preflight's command lines compared as strings, and its checks run for real: through the
real ssh client (a host name that cannot resolve), and through a remote shell that runs the
command on this machine, as a host sharing this file system would. The checks across network
namespaces, through the coordinator, are in tests/coordinator/test_several_hosts.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from jobkit import DPTRAIN

import dptrain
from dptrain.coordinator.server.launchers.base import LaunchError, SharedPath
from dptrain.coordinator.server.launchers.preflight import (
    HostCheck,
    check_script,
    preflight_commands,
    remote_shell,
    run_preflight,
)


def test_command_lines():
    assert remote_shell("node1", "true") == [
        "ssh", "-x", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "node1", "true"]
    assert remote_shell("node1", "true", "/opt/site/rsh --quiet") == [
        "/opt/site/rsh", "--quiet", "-x", "node1", "true"]
    checks = preflight_commands((("localhost", 2), ("node1", 4), ("node2", 1)),
                                python="/v/bin/python", paths=["/jobs/j 1"])
    assert [c.host for c in checks] == ["node1", "node2"]  # localhost needs no remote shell
    assert checks[0].argv[-1] == checks[1].argv[-1] == (
        "test -x /v/bin/python || { echo 'no Python at /v/bin/python (the same virtual "
        "environment must be at the same path on every host)'; exit 97; }; "
        "v=$(/v/bin/python -c 'import dptrain; print(dptrain.__version__)' 2>&1) || { echo "
        "\"/v/bin/python cannot import dptrain: $(echo \"$v\" | tail -n 1)\"; exit 97; }; "
        f"test \"$v\" = {dptrain.__version__} || {{ echo \"dptrain $v there, "
        f"{dptrain.__version__} here\"; exit 97; }}; "
        "test -e '/jobs/j 1' || { echo 'no /jobs/j 1 there (it must be on a file system "
        "every host shares)'; exit 97; }")


def _here(host: str, script: str) -> HostCheck:
    """The check run by a "remote" shell that is this machine's sh."""
    return HostCheck(host, ("sh", "-c", script))


def test_checks_pass_where_everything_is_in_place(tmp_path):
    run_preflight([_here("node1", check_script(sys.executable, [tmp_path]))])


@pytest.mark.parametrize("python, paths, version, cause", [
    ("/opt/none/bin/python", [], dptrain.__version__,
     "no Python at /opt/none/bin/python (the same virtual environment must be at the same path "
     "on every host)"),
    (sys.executable, [], "0.0.1.dev0", f"dptrain {dptrain.__version__} there, 0.0.1.dev0 here"),
    (sys.executable, ["/nonexistent/jobs/j-1"], dptrain.__version__,
     "no /nonexistent/jobs/j-1 there (it must be on a file system every host shares)"),
])
def test_each_failed_check_is_one_line_naming_host_and_cause(python, paths, version, cause):
    with pytest.raises(LaunchError) as info:
        run_preflight([_here("node1", "true"),
                       _here("node2", check_script(python, paths, version))])
    assert str(info.value) == f"preflight: host node2: {cause}"


def test_shared_paths_are_checked_in_order_each_failure_saying_what_it_is(tmp_path):
    data, ca = tmp_path / "train.npz", tmp_path / "it's ca.pem"  # a quote: quoted for sh
    shared = [SharedPath(str(data), "dataset.args.path: data"),
              SharedPath(str(ca), "DPTRAIN_TLS_CA: the CA's certificate")]
    with pytest.raises(LaunchError) as info:
        run_preflight([_here("node2", check_script(sys.executable, [tmp_path, *shared]))])
    assert str(info.value) == f"preflight: host node2: no {data} there (dataset.args.path: data)"
    data.write_bytes(b"")
    with pytest.raises(LaunchError) as info:
        run_preflight([_here("node2", check_script(sys.executable, [tmp_path, *shared]))])
    assert str(info.value) == (f"preflight: host node2: no {ca} there (DPTRAIN_TLS_CA: the "
                               f"CA's certificate)")
    ca.write_bytes(b"")
    run_preflight([_here("node2", check_script(sys.executable, [tmp_path, *shared]))])


def test_a_python_without_dptrain_is_named(tmp_path):
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None:
        pytest.skip("needs a system python3 without dptrain in /usr/bin")
    with pytest.raises(LaunchError, match=f"^preflight: host n: {bare} cannot import dptrain: "
                                          f"ModuleNotFoundError: No module named 'dptrain'$"):
        run_preflight([_here("n", check_script(bare, []))])


def test_an_unresolvable_host_through_ssh():
    if shutil.which("ssh") is None:
        pytest.skip("needs the ssh client (Debian: apt-get install openssh-client)")
    [check] = preflight_commands((("node-that-does-not-exist.invalid", 1),),
                                 python=sys.executable, paths=[])
    with pytest.raises(LaunchError) as info:
        run_preflight([check])
    assert str(info.value).startswith(
        "preflight: host node-that-does-not-exist.invalid: unreachable through ssh (exit code "
        "255): ssh: Could not resolve hostname node-that-does-not-exist.invalid")


def test_a_missing_remote_shell_and_several_failures():
    with pytest.raises(LaunchError, match="^preflight: host a: cannot run the remote shell "
                                          "/nonexistent/rsh: No such file or directory$"):
        run_preflight([HostCheck("a", ("/nonexistent/rsh", "-x", "a", "true"))])
    with pytest.raises(LaunchError, match=r"^preflight: host a: unreachable through sh \(exit "
                                          r"code 3\): down \(and 1 more host\(s\)\)$"):
        run_preflight([_here("a", "echo down; exit 3"), _here("b", "exit 255")])


def test_dptrain_run_runs_the_preflight_before_mpiexec(tmp_path, repo_root):
    if shutil.which("ssh") is None:
        pytest.skip("needs the ssh client (Debian: apt-get install openssh-client)")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\nnode-that-does-not-exist.invalid slots=1\n")
    result = subprocess.run(
        [DPTRAIN, "run", "examples/digits_mlp.yaml", "-n", "2", "--hostfile", str(hostfile)],
        cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "dptrain: error: preflight: host node-that-does-not-exist.invalid: unreachable through "
        "ssh (exit code 255): ssh: Could not resolve hostname node-that-does-not-exist.invalid")
    assert result.stderr.count("\n") == 1 and result.stdout == ""
