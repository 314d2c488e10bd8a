"""Helpers for the runner and end-to-end tests: tiny job specs, stand-in ``mpiexec`` scripts,
a coordinator in a process of its own, waiting, and finding processes a test left behind."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DPTRAIN = str(Path(sys.executable).parent / "dptrain")

#: A digits MLP that trains in well under a second: 20 steps, a checkpoint every 5.
TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"name": "mlp", "args": {"in_features": 64, "hidden": [32], "num_classes": 10}},
    "dataset": {"name": "digits", "validation_fraction": 0.25},
    "optimizer": {"name": "adam", "lr": 0.001},
    "batch_size": 32, "max_steps": 20, "eval_every": 10, "seed": 0, "workers": 2,
    "checkpoint": {"every_steps": 5, "keep": 2},
}

#: The validation accuracy TINY_SPEC's run reaches at least: it is seeded, and every run
#: measured reached 93 of 449 (0.207, twice chance); the margin is for another BLAS's rounding.
TINY_VAL_ACCURACY = 0.2

#: A wider MLP that trains for a few seconds on two shared cores (a checkpoint every 10 steps),
#: long enough to kill something mid-job.
SLOW_SPEC: dict[str, Any] = {
    **TINY_SPEC, "name": "slow",
    "model": {"name": "mlp", "args": {"in_features": 64, "hidden": [512, 512],
                                      "num_classes": 10}},
    "batch_size": 64, "max_steps": 250, "eval_every": 0,
    "checkpoint": {"every_steps": 10, "keep": 2},
}


#: A user's model (``faulty:build``, for a job on synthetic data with 32 features and 5
#: classes) that raises, or produces NaN, on one rank from a given training step on.
FAULTY_MODEL = '''
from dptrain.engine import nn
from dptrain.worker.comm import Communicator


class Faulty(nn.Module):
    def __init__(self, mode, rank, step):
        super().__init__()
        self.linear = nn.Linear(32, 5)
        self.mode, self.rank, self.step, self.calls = mode, rank, step, 0

    def forward(self, x):
        self.calls += self.training
        if Communicator().rank == self.rank and self.calls >= self.step:
            if self.mode == "raise":
                raise RuntimeError(f"injected failure at step {self.calls}")
            return self.linear(x) * float("nan")
        return self.linear(x)


def build(mode="raise", rank=1, step=3):
    return Faulty(mode, rank, step)
'''


def held_out_metrics(model_file: str | Path, job_spec: dict[str, Any]) -> tuple[float, float]:
    """The accuracy and mean cross-entropy of a digits MLP checkpoint on its job's validation
    split, computed here in float64 numpy: an independent check of what the worker reports.

    Args:
        model_file: the checkpoint's ``model.safetensors`` (``0.weight``, ``0.bias``, ...).
        job_spec: the job (its ``seed`` and ``dataset.validation_fraction`` give the split).

    Returns:
        ``(val_accuracy, val_loss)``.
    """
    import numpy as np
    from safetensors.numpy import load_file
    from sklearn.datasets import load_digits

    from dptrain.worker.data import train_validation_split

    weights = {k: v.astype(np.float64) for k, v in load_file(str(model_file)).items()}
    digits = load_digits()
    _, val = train_validation_split(len(digits.target),
                                    job_spec["dataset"]["validation_fraction"], job_spec["seed"])
    h, y = digits.data[val] / 16.0, digits.target[val]
    layers = sorted({int(name.split(".")[0]) for name in weights})
    for i, layer in enumerate(layers):  # Linear, ReLU, Linear, ...
        h = h @ weights[f"{layer}.weight"].T + weights[f"{layer}.bias"]
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    shifted = h - h.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float((h.argmax(axis=1) == y).mean()), float(-log_p[np.arange(len(y)), y].mean())


def spec(base: dict[str, Any] = TINY_SPEC, **changes: Any) -> dict[str, Any]:
    """A copy of a spec with some top-level fields changed."""
    out = copy.deepcopy(base)
    out.update(changes)
    return out


#: The step of the checkpoint a stand-in's ``complete "$@"`` leaves (`fake_mpiexec`).
FAKE_FINAL_STEP = 20


def fake_mpiexec(folder: Path, body: str, name: str = "fake-mpiexec") -> str:
    """Write an executable shell script that stands in for ``mpiexec``.

    It receives the real command line (``"$@"``), so ``--resume`` can be looked for, and the
    real environment (``DPTRAIN_RUN_ID`` included). ``complete "$@"`` in `body` ends like a
    completed run: a real checkpoint of step `FAKE_FINAL_STEP` appears in the command line's
    ``--checkpoint-dir`` and the worker's final JSON line is printed (the runner makes a job
    SUCCEEDED only with its final checkpoint).

    Args:
        folder: where to write it.
        body: the script after ``#!/bin/sh`` and the definition of ``complete``.
        name: the file name.

    Returns:
        Its path.
    """
    step = f"step-{FAKE_FINAL_STEP:08d}"
    template = folder / "fake-checkpoint"
    if not (template / step).is_dir():
        small_checkpoint(template, FAKE_FINAL_STEP)
    complete = (f"complete() {{\n"
                f"  while [ $# -gt 0 ]; do [ \"$1\" = --checkpoint-dir ] && dir=$2; shift; done\n"
                f"  mkdir -p \"$dir\" && rm -rf \"$dir/{step}\" && cp -R '{template / step}' "
                f"\"$dir/\"\n"
                f"  echo '{{\"status\": \"completed\", \"step\": {FAKE_FINAL_STEP}}}'\n"
                f"}}\n")
    path = folder / name
    path.write_text("#!/bin/sh\n" + complete + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def small_checkpoint(root: Path, step: int) -> str:
    """Write a real worker checkpoint of a small model (its values depend on `step`) under
    `root`; returns its directory."""
    from dptrain import engine
    from dptrain.worker.checkpoint import write_checkpoint

    engine.manual_seed(step)
    model = engine.nn.Linear(4, 3)
    optimizer = engine.optim.Adam(model.parameters(), lr=0.01)
    model(engine.randn(5, 4)).square().mean().backward()
    optimizer.step()
    info = {"epoch": 0, "position": step, "rng": {"engine": [engine.get_rng_state()]},
            "spec": TINY_SPEC, "scheduler": None, "metrics": {}}
    return write_checkpoint(root, step, model.state_dict(), optimizer.state_dict(), info)


def linear_checkpoint(root: Path, step: int, width: int) -> Path:
    """Write a worker checkpoint of a `width` x `width` linear model with Adam's state (about
    12 x width² bytes in all; its values depend on `step`) under `root`; returns its
    directory."""
    from dptrain import engine
    from dptrain.worker.checkpoint import write_checkpoint

    engine.manual_seed(step)
    model = engine.nn.Linear(width, width)
    optimizer = engine.optim.Adam(model.parameters(), lr=0.01)
    return Path(write_checkpoint(root, step, model.state_dict(), optimizer.state_dict(),
                                 {"epoch": 0, "position": step, "metrics": {},
                                  "spec": TINY_SPEC}))


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1,
             what: str = "the condition") -> Any:
    """Poll until `predicate()` is truthy and return it; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def descendants(root: int) -> list[int]:
    """Live (not zombie) processes below `root` in the process tree."""
    parents: dict[int, int] = {}
    states: dict[int, bytes] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields:
                states[int(name)] = fields[0]
                parents[int(name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                found.append(pid)
                frontier.append(pid)
    return [pid for pid in found if states.get(pid) != b"Z"]


def processes_with_env(text: str) -> list[int]:
    """Pids of this user's processes whose environment contains `text` (e.g. a state dir)."""
    found = []
    needle = text.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def rank_pids(run_id: str) -> list[int]:
    """The ``python -m dptrain.worker`` processes of one attempt (by its ``DPTRAIN_RUN_ID``),
    not the ``mpiexec`` or ``srun`` that started them with the same words."""
    pids = []
    for pid in processes_with_env(f"DPTRAIN_RUN_ID={run_id}"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        is_rank = b"dptrain.worker" in argv and b"-m" in argv
        starter = os.path.basename(argv[0])
        if is_rank and b"mpiexec" not in starter and starter != b"srun":
            pids.append(pid)
    return pids


def kill_all(pids: list[int]) -> None:
    """SIGKILL every pid (gone ones are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, nor on the port after it
    (where ``dptrain serve --port P`` puts its data port by default)."""
    while True:
        with socket.socket() as s, socket.socket() as after:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                after.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def run_cli(address: str, state_dir: Path, *args: str,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``dptrain --address ADDRESS --state-dir STATE_DIR ARGS...``, without any inherited
    ``DPTRAIN_*`` variable."""
    return subprocess.run(
        [DPTRAIN, "--address", address, "--state-dir", str(state_dir), *args],
        capture_output=True, text=True, timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")})


def tensor_digests(path: str | Path) -> dict[str, str]:
    """sha256 of each tensor of a safetensors file (dtype, shape and bytes), read by the
    safetensors library rather than by our engine."""
    from safetensors.numpy import load_file

    return {name: hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()
            for name, a in load_file(str(path)).items()}


class ServeProcess:
    """``dptrain serve`` in a process (and session) of its own, on a fixed port and state
    directory, so that a test can kill it with SIGKILL and start it again.

    Args:
        state_dir: its state directory.
        log: the file its stderr is appended to.
        args: more ``serve`` options.
    """

    def __init__(self, state_dir: Path, log: Path, *args: str):
        self.state_dir, self.log, self.args = state_dir, log, args
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait until it serves."""
        from dptrain.coordinator.client.client import Client, ClientError

        with open(self.log, "ab") as stderr:
            self.proc = subprocess.Popen(
                [DPTRAIN, "serve", "--state-dir", str(self.state_dir), "--port", str(self.port),
                 *self.args], stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")})

        def healthy() -> bool:
            assert self.proc.poll() is None, f"dptrain serve exited: {self.log.read_text()}"
            with Client(self.address) as client:
                try:
                    return client.health(timeout=1) == "SERVING"
                except ClientError:
                    return False

        wait_for(healthy, 60, what="the coordinator to serve")

    def client(self):
        """A `coordinator.client.Client` of it (with the token of its state directory)."""
        from dptrain.coordinator.client.client import Client

        return Client(self.address, state_dir=self.state_dir, timeout=10)

    def kill(self) -> None:
        """kill -9, as a crash or the OOM killer would."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """Stop it gracefully (SIGTERM: its jobs checkpoint), else kill it; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
