"""``dptrain tls init``: the files it writes, checked by openssl (an independent verifier) and
by a real coordinator serving TLS with them to a client that trusts only the CA."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from jobkit import DPTRAIN

from dptrain.coordinator.api.records import JobState
from dptrain.coordinator.client import Client, ClientError

SPEC = {"name": "t", "model": {"name": "mlp", "args": {"in_features": 4, "num_classes": 2}},
        "dataset": {"name": "synthetic", "args": {"n": 8, "features": 4, "classes": 2}},
        "optimizer": {"name": "sgd", "lr": 0.1}, "batch_size": 4, "max_steps": 1}


def _init(directory, *hosts, extra=()):
    return subprocess.run([DPTRAIN, "tls", "init", str(directory), *[
        arg for h in hosts for arg in ("--host", h)], *extra], capture_output=True, text=True,
        timeout=120)


def test_init_writes_a_ca_and_a_certificate_for_every_host(tmp_path):
    result = _init(tmp_path / "tls", "coord.example.org", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    d = tmp_path / "tls"
    assert stat.S_IMODE((d / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert sorted(p.name for p in d.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert result.stdout.splitlines()[2] == (
        f"  dptrain serve --host 0.0.0.0 --advertise-address coord.example.org:50051 --port "
        f"50051 --tls-cert {d}/server.pem --tls-key {d}/server.key --tls-ca {d}/ca.pem")
    assert f"  dptrain --address coord.example.org:50051 --tls-ca {d}/ca.pem jobs" in (
        result.stdout.splitlines())
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to verify the certificate independently")
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.pem"),
                             str(d / "server.pem")], capture_output=True, text=True, timeout=60)
    assert verify.stdout.strip() == f"{d}/server.pem: OK", verify.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(d / "server.pem"), "-noout", "-ext",
                            "subjectAltName"], capture_output=True, text=True, timeout=60)
    assert names.stdout.split("\n", 1)[1].strip() == "DNS:coord.example.org, IP Address:10.1.2.3"
    # The CA's key is not kept: no file holds a second private key.
    assert [p.name for p in d.iterdir() if b"PRIVATE KEY" in p.read_bytes()] == ["server.key"]


def test_existing_files_are_kept_and_bad_hosts_refused(tmp_path):
    assert _init(tmp_path / "tls", "localhost").returncode == 0
    before = (tmp_path / "tls" / "ca.pem").read_bytes()
    again = _init(tmp_path / "tls", "localhost")
    assert again.returncode == 2
    assert again.stderr == (f"dptrain: error: {tmp_path}/tls/ca.pem: exists already; remove it "
                            f"or pass --force to replace the CA and the server's certificate\n")
    assert (tmp_path / "tls" / "ca.pem").read_bytes() == before
    assert _init(tmp_path / "tls", "localhost", extra=("--force",)).returncode == 0
    assert (tmp_path / "tls" / "ca.pem").read_bytes() != before
    bad = _init(tmp_path / "other", "bad name")
    assert bad.returncode == 2
    assert bad.stderr == ("dptrain: error: --host: must be a DNS name or an IP address, got "
                          "'bad name'\n")


def test_a_coordinator_serves_with_them_to_a_client_trusting_the_ca(tmp_path, serve_coordinator):
    assert _init(tmp_path / "tls", "localhost", "127.0.0.1").returncode == 0
    d = tmp_path / "tls"
    server = serve_coordinator(port=0, tls_cert=d / "server.pem", tls_key=d / "server.key",
                               tls_ca=d / "ca.pem")
    for address in (f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        with Client(address, token=server.token, tls_ca=d / "ca.pem") as client:
            assert client.submit_job(SPEC).state is JobState.QUEUED
    # A CA of another `tls init` is not trusted.
    assert _init(tmp_path / "other", "localhost").returncode == 0
    with Client(f"localhost:{server.port}", token=server.token, tls_ca=tmp_path / "other/ca.pem",
                timeout=5) as stranger:
        with pytest.raises(ClientError, match="^UNAVAILABLE: "):
            stranger.list_jobs()
