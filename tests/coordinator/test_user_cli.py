"""``dptrain user ...`` and the CLI's messages about tokens and TLS, through the REAL command
line against a REAL coordinator on loopback (TLS files from ``dptrain tls init``)."""

from __future__ import annotations

import json
import stat
import subprocess

from jobkit import DPTRAIN, run_cli

from dptrain.coordinator.server.scheduler import Cluster

JOB = {"name": "tiny", "model": {"name": "mlp", "args": {"in_features": 4, "num_classes": 3}},
       "dataset": {"name": "synthetic", "args": {"n": 64, "features": 4, "classes": 3}},
       "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 8, "max_steps": 20}


def test_an_admin_manages_users_from_the_command_line(serve_coordinator, state_dir, tmp_path):
    server = serve_coordinator(cluster=Cluster.local(4))
    added = run_cli(server.address, state_dir, "user", "add", "alice", "--out",
                    str(tmp_path / "alice.token"))
    assert added.returncode == 0, added.stderr
    token = (tmp_path / "alice.token").read_bytes()
    assert len(token) == 43 and not token.endswith(b"\n")  # no newline: grpc-js reads it too
    assert stat.S_IMODE((tmp_path / "alice.token").stat().st_mode) == 0o600
    printed = run_cli(server.address, state_dir, "user", "add", "bob", "--admin")
    assert printed.returncode == 0, printed.stderr
    assert len(printed.stdout) == 43  # stdout is a pipe: the token alone, `> file` ready
    assert printed.stderr == "the token of user bob (it is shown nowhere else):\n"
    listed = run_cli(server.address, state_dir, "user", "list")
    assert [line.split()[:3] for line in listed.stdout.splitlines()] == [
        ["NAME", "ROLE", "TOKEN"], ["admin", "admin", "active"], ["alice", "user", "active"],
        ["bob", "admin", "active"]]

    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(JOB))
    alice = ("--token-file", str(tmp_path / "alice.token"))
    submitted = run_cli(server.address, state_dir, *alice, "submit", str(job_file))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    jobs = run_cli(server.address, state_dir, "jobs")  # the built-in admin sees it
    assert jobs.stdout.splitlines()[1].split()[:4] == [job_id, "tiny", "alice", "QUEUED"]
    status = run_cli(server.address, state_dir, *alice, "status", job_id)
    assert "owner:      alice" in status.stdout.splitlines()

    revoked = run_cli(server.address, state_dir, "user", "revoke", "alice")
    assert revoked.returncode == 0, revoked.stderr
    refused = run_cli(server.address, state_dir, *alice, "status", job_id)
    assert refused.returncode == 6
    assert refused.stderr.splitlines() == [
        "dptrain: error: UNAUTHENTICATED: invalid token: no user holds it (unknown, revoked, "
        "or replaced by a newer one: dptrain user token NAME) (sent the token file "
        f"{tmp_path / 'alice.token'}; pass another with --token-file FILE, $DPTRAIN_TOKEN or "
        "$DPTRAIN_TOKEN_FILE)"]
    reissued = run_cli(server.address, state_dir, "user", "token", "alice")
    assert reissued.returncode == 0, reissued.stderr
    (tmp_path / "alice.token").write_text(reissued.stdout)
    assert run_cli(server.address, state_dir, *alice, "status", job_id).returncode == 0
    denied = run_cli(server.address, state_dir, *alice, "user", "list")
    assert denied.returncode == 6 and "is for admins only; user 'alice' is not an admin" in (
        denied.stderr)


def test_no_token_names_where_it_looked(serve_coordinator, state_dir, tmp_path):
    server = serve_coordinator(cluster=Cluster.local(4))
    missing = run_cli(server.address, tmp_path / "elsewhere", "jobs")
    assert missing.returncode == 6
    assert missing.stderr.splitlines() == [
        "dptrain: error: UNAUTHENTICATED: missing bearer token: send the metadata "
        "'authorization: Bearer <token>' (a user's token: dptrain user token NAME; the built-in "
        "admin's is in the server's STATE_DIR/token) (sent no token (none given, no "
        f"$DPTRAIN_TOKEN or $DPTRAIN_TOKEN_FILE, nor {tmp_path / 'elsewhere' / 'token'}); pass "
        "one with --token-file FILE, $DPTRAIN_TOKEN or $DPTRAIN_TOKEN_FILE)"]


def _tls_init(directory):
    result = subprocess.run([DPTRAIN, "tls", "init", str(directory), "--host", "127.0.0.1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory


def test_a_tls_server_without_its_ca_says_to_pass_tls_ca(serve_coordinator, state_dir,
                                                           tmp_path):
    tls = _tls_init(tmp_path / "tls")
    other = _tls_init(tmp_path / "other")
    server = serve_coordinator(cluster=Cluster.local(4), tls_cert=tls / "server.pem",
                               tls_key=tls / "server.key")
    plaintext = run_cli(server.address, state_dir, "user", "list")
    assert plaintext.returncode == 5
    assert plaintext.stderr.splitlines() == [
        f"dptrain: error: UNAVAILABLE: the coordinator at {server.address} serves TLS and this "
        f"client spoke plaintext: pass its CA certificate with --tls-ca PEM (or "
        f"$DPTRAIN_TLS_CA; dptrain tls init wrote it as ca.pem)"]
    wrong_ca = run_cli(server.address, state_dir, "--tls-ca", str(other / "ca.pem"), "jobs")
    assert wrong_ca.returncode == 5
    [line] = wrong_ca.stderr.splitlines()
    assert line.startswith(f"dptrain: error: UNAVAILABLE: the TLS handshake with the "
                           f"coordinator at {server.address} failed: pass the CA certificate "
                           f"that signed its certificate with --tls-ca PEM")
    right = run_cli(server.address, state_dir, "--tls-ca", str(tls / "ca.pem"), "user", "list")
    assert right.returncode == 0, right.stderr
