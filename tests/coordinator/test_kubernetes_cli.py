"""``dptrain render-job`` and ``dptrain serve --launcher kubernetes``: what the commands print
and refuse, and that rendering loads neither the server's heavy parts nor the engine (checked in
a fresh interpreter)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import yaml
from fresh_imports import modules_loaded_by, within
from repo import REPO

from dptrain.coordinator.cli import build_parser, main
from dptrain.coordinator.server.command import launcher_and_cluster
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher

DIGITS = str(REPO / "examples" / "digits_mlp.yaml")


def render(capsys, *args):
    code = main(["render-job", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_render_job_prints_the_mpijob_of_the_jobs_first_attempt(capsys):
    code, out, err = render(capsys, DIGITS, "--launcher", "kubernetes", "--image", "reg/dp:1",
                            "--namespace", "ml", "--slots-per-worker", "2")
    assert (code, err) == (0, "")
    manifest = yaml.safe_load(out)
    assert (manifest["kind"], manifest["metadata"]["name"], manifest["metadata"]["namespace"]) \
        == ("MPIJob", "dptrain-j-000000000000-1", "ml")
    launcher = manifest["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    container = launcher["containers"][0]
    # examples/digits_mlp.yaml says workers: 2 -> 2 ranks, 2 per pod -> 1 worker pod
    assert container["command"][4:7] == ["/opt/dptrain/bin/mpiexec", "-n", "2"]
    assert manifest["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 1
    assert container["image"] == "reg/dp:1"
    job_dir = "/var/lib/dptrain/jobs/j-000000000000"
    assert f"{job_dir}/spec.json" in container["command"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["DPTRAIN_COORDINATOR"] == "dptrain-coordinator.ml.svc:50051"
    assert env["DPTRAIN_JOB_TOKEN"] == {"secretKeyRef": {"name": "dptrain-j-000000000000-1",
                                                         "key": "token"}}
    assert "&id" not in out and "*id" not in out  # plain YAML, no anchors for kubectl users
    # the same job renders the same manifest
    assert render(capsys, DIGITS, "--launcher", "kubernetes", "--image", "reg/dp:1",
                  "--namespace", "ml", "--slots-per-worker", "2")[1] == out


def test_render_job_options_reach_the_manifest(capsys):
    code, out, _ = render(capsys, DIGITS, "--launcher", "kubernetes", "--image", "i:1",
                          "--job-id", "j-abc", "--coordinator", "coord:7000",
                          "--cluster-state-dir", "/srv/dp", "--tls-secret", "dp-tls")
    assert code == 0
    container = yaml.safe_load(out)["spec"]["mpiReplicaSpecs"]["Launcher"]["template"][
        "spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DPTRAIN_COORDINATOR"] == "coord:7000"
    assert env["DPTRAIN_JOB_ID"] == "j-abc"
    assert env["DPTRAIN_TLS_CA"] == "/etc/dptrain/tls/ca.pem"
    assert "/srv/dp/jobs/j-abc/spec.json" in container["command"]


@pytest.mark.parametrize(("args", "message"), [
    ([], "dptrain: error: --image: the kubernetes launcher needs the workers' container image"),
    (["--image", "i", "--namespace", "Big_NS"], "dptrain: error: --namespace: must be a DNS "
                                                "label"),
    (["--image", "i", "--memory-per-rank", "lots"], "dptrain: error: --memory-per-rank: must "
                                                    "be an integer with an optional unit"),
])
def test_render_job_refuses_bad_options_naming_them(capsys, args, message):
    code, out, err = render(capsys, DIGITS, "--launcher", "kubernetes", *args)
    assert (code, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1


def test_render_job_refuses_a_job_without_a_usable_workers_count(capsys, tmp_path):
    job = tmp_path / "job.yaml"
    example = (REPO / "examples" / "digits_mlp.yaml").read_text()
    job.write_text(re.sub(r"(?m)^workers: .*$", "workers: 0", example))
    code, _, err = render(capsys, str(job), "--launcher", "kubernetes", "--image", "i")
    assert code == 2
    assert err == f"dptrain: error: {job}: workers: must be >= 1, got 0\n"
    job.write_text("name: x\nworkers: two\n")  # the spec's own type rules, and only those
    code, _, err = render(capsys, str(job), "--launcher", "kubernetes", "--image", "i")
    assert code == 2 and "workers: must be an integer, got 'two'" in err
    code, _, err = render(capsys, str(tmp_path / "none.yaml"), "--launcher", "kubernetes",
                          "--image", "i")
    assert code == 2 and "cannot read the job file" in err


def test_render_job_loads_no_server_engine_grpc_or_job_code(tmp_path):
    # A job naming a module of its own: rendering must not import it (it would print).
    (tmp_path / "own_model.py").write_text("print('IMPORTED')\n")
    job = tmp_path / "job.yaml"
    spec = yaml.safe_load((REPO / "examples" / "digits_mlp.yaml").read_text())
    job.write_text(yaml.safe_dump({**spec, "workers": 3, "model": {"name": "own_model:Net"}}))
    statement = (f"import os, sys; os.chdir({str(tmp_path)!r}); sys.path.insert(0, '.')\n"
                 f"from dptrain.coordinator.cli import main\n"
                 f"assert main(['render-job', 'job.yaml', '--launcher', 'kubernetes', "
                 f"'--image', 'i']) == 0")
    loaded = modules_loaded_by(statement)
    assert "own_model" not in loaded
    assert within(loaded, "grpc", "sqlite3", "numpy", "kubernetes", "dptrain.engine",
                  "dptrain.coordinator.server.server", "dptrain.coordinator.server.runner",
                  "dptrain.coordinator.server.store", "dptrain.worker.train") == []


# ---------------------------------------------------------------- serve --launcher

def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_serve_defaults_to_the_mpiexec_launcher():
    assert isinstance(launcher_and_cluster(serve_args())[0], MpiexecLauncher)


@pytest.mark.parametrize(("argv", "message"), [
    (["--slots", "4"], "--image: the kubernetes launcher needs the workers' container image"),
    (["--image", "i"], "--slots: with --launcher kubernetes, give how many ranks may run"),
    (["--image", "i", "--hostfile", "h"], "--hostfile: the kubernetes launcher places ranks in "
                                          "worker pods"),
    (["--image", "i", "--slots", "4", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
     "--tls-secret: the coordinator serves TLS, so the worker pods need its CA certificate"),
])
def test_serve_kubernetes_refuses_options_that_cannot_work(argv, message):
    with pytest.raises(ValueError, match="^" + message):
        launcher_and_cluster(serve_args("--launcher", "kubernetes", *argv))


def test_serve_kubernetes_builds_its_launcher_from_the_options(tmp_path, monkeypatch):
    pytest.importorskip("kubernetes", reason="needs the 'kubernetes' package "
                                             "(pip install 'dptrain[kubernetes]')")
    from dptrain.coordinator.server.launchers.kubernetes import KubernetesLauncher

    kubeconfig = tmp_path / "kubeconfig"  # any API server: nothing is contacted yet
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    launcher, _ = launcher_and_cluster(serve_args(
        "--launcher", "kubernetes", "--image", "reg/dp:1", "--namespace", "ml", "--slots", "8",
        "--slots-per-worker", "4", "--state-claim", "dp-state", "--cpu-per-rank", "1"))
    assert isinstance(launcher, KubernetesLauncher)
    s = launcher.settings
    assert (s.image, s.namespace, s.slots_per_worker, s.state_claim, s.cpu_per_rank) == (
        "reg/dp:1", "ml", 4, "dp-state", "1")
