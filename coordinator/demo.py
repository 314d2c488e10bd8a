"""``dptrain demo``: the whole flow on one machine, in about a minute.

Starts a coordinator on a free loopback port with a temporary state directory and the real
runner, submits ``examples/digits_mlp.yaml`` on 2 worker processes through the gRPC client,
follows it with the progress bar, prints the final held-out accuracy, downloads the trained
parameters (``model.safetensors`` of the last checkpoint, its digest verified) and shuts
everything down: the server, the runner and every worker process.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from dptrain.coordinator.api.records import JobState
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.client.follow import final_summary, follow_job

__all__ = ["run_demo", "DEMO_JOB"]

DEMO_JOB = Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.yaml"
# The same job, for an installation without the repository's examples/ folder.
_FALLBACK_SPEC: dict[str, Any] = {
    "name": "digits-mlp",
    "model": {"name": "mlp", "args": {"in_features": 64, "hidden": [128, 64],
                                      "num_classes": 10}},
    "dataset": {"name": "digits", "validation_fraction": 0.25},
    "optimizer": {"name": "adam", "lr": 1.0e-3},
    "batch_size": 64, "epochs": 30, "eval_every": 200, "seed": 0, "workers": 2,
    "device": "cpu", "checkpoint": {"every_steps": 200, "keep": 3},
}


def _demo_spec(workers: int) -> dict[str, Any]:
    try:
        with open(DEMO_JOB, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except OSError:
        spec = dict(_FALLBACK_SPEC)
    spec["workers"] = workers
    return spec


def run_demo(output: str | os.PathLike = "digits-mlp.safetensors", workers: int = 2,
             stream: Any = None) -> int:
    """Train the digits MLP through an embedded coordinator and download its parameters.

    Args:
        output: where the trained parameters go.
        workers: worker processes (ranks).
        stream: where the progress bar and messages go (default: stderr).

    Returns:
        0 when the job succeeded and its parameters were downloaded, else 1.
    """
    from dptrain.coordinator.server.runner_settings import RunnerSettings
    from dptrain.coordinator.server.scheduler import Cluster
    from dptrain.coordinator.server.server import ServerSettings, serve

    stream = sys.stderr if stream is None else stream
    state_dir = tempfile.mkdtemp(prefix="dptrain-demo-")
    started = time.monotonic()
    server = serve(ServerSettings(
        state_dir, "127.0.0.1", 0, cluster=Cluster.local(max(workers, os.cpu_count() or 1)),
        runner=RunnerSettings(state_dir, heartbeat_timeout=60.0, kill_grace=5.0)))
    try:
        print(f"dptrain demo: coordinator on {server.address} (state in {state_dir})",
              file=stream, flush=True)
        with Client(server.address, token=server.token) as client:
            job = client.submit_job(_demo_spec(workers))
            print(f"dptrain demo: submitted {job.id} ({job.name}) on {workers} worker "
                  f"processes", file=stream, flush=True)
            follow_job(client.watch_job(job.id), stream=stream)
            job = client.get_job(job.id)
            print(final_summary(job), flush=True)
            if job.state is not JobState.SUCCEEDED:
                return 1
            got = client.download_checkpoint(job.id, dest=output)
        accuracy = job.metrics.get("val_accuracy")
        print(f"held-out accuracy: {accuracy:.4f}" if isinstance(accuracy, float)
              else "held-out accuracy: not reported", flush=True)
        print(f"trained parameters: {Path(got.path).resolve()} (step {got.step}, "
              f"{got.size} bytes, {got.algorithm} {got.digest[:16]}…; open with dptrain.load or "
              f"safetensors)", flush=True)
        print(f"dptrain demo: done in {time.monotonic() - started:.0f} s", file=stream,
              flush=True)
        return 0
    finally:
        server.stop(grace=1.0)
        shutil.rmtree(state_dir, ignore_errors=True)
