"""Fixtures the coordinator's end-to-end tests share (``test_e2e.py``, ``test_slurm.py``)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from jobkit import DPTRAIN, tensor_digests


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(*specs)``: for each spec, the tensor digests of the final parameters of an
    undisturbed ``dptrain run`` of it (the runs go in parallel; each spec runs once)."""
    known: dict[str, dict[str, str]] = {}

    def digests(*specs: dict) -> list[dict[str, str]]:
        runs = []
        for job_spec in specs:
            key = json.dumps(job_spec, sort_keys=True)
            if key in known:
                continue
            directory = tmp_path_factory.mktemp("undisturbed")
            (directory / "job.json").write_text(key)
            runs.append((key, directory, subprocess.Popen(
                [DPTRAIN, "run", str(directory / "job.json"), "-n", str(job_spec["workers"]),
                 "--checkpoint-dir", str(directory / "ckpt"), "--no-progress"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")})))
        for key, directory, proc in runs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            final = directory / "ckpt" / f"step-{json.loads(key)['max_steps']:08d}"
            known[key] = tensor_digests(final / "model.safetensors")
        return [known[json.dumps(job_spec, sort_keys=True)] for job_spec in specs]

    return digests
