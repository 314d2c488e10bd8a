"""Your own training loop on every rank: ``ctx = dptrain.worker.init()``, as under torchrun.

A script that trains with its own loop gets the service a declarative job gets through a
small context: who it is (``rank``, ``world_size``, ``local_rank``, ``comm``, ``device``),
where it resumes from (``resume``), its epochs (`Context.epochs`, setting the samplers'
epoch), progress (`Context.report`) and checkpoints (`Context.save_checkpoint`,
`Context.load_checkpoint`) in the declarative jobs' format and storage
(`dptrain.worker.checkpoint`). Reports and checkpoints go through the same reporters as a
declarative job's (`dptrain.worker.events`): to the coordinator when the job runs under one,
and always as lines on rank 0's stdout::

    import dptrain.worker
    from dptrain.worker import DistributedDataParallel, DistributedSampler

    ctx = dptrain.worker.init()
    model = DistributedDataParallel(build().to(ctx.device), ctx.comm, allreduce=ctx.allreduce)
    opt = engine.optim.SGD(model.parameters(), lr=0.1)
    state = ctx.load_checkpoint()            # None on a fresh start
    if state is not None:
        model.module.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
    sampler = DistributedSampler(len(x), seed=0)
    for epoch in ctx.epochs(10, sampler):    # resumes after the checkpoint's epoch
        ...
        ctx.report(step, loss=loss.item())
        ctx.save_checkpoint({"model": model.module, "optimizer": opt}, step)

Run it with ``dptrain run train.py -n 2 -- --lr 0.1``, plain ``mpiexec -n 2 python train.py``,
or as a job's ``entrypoint`` (``python -m dptrain.worker`` runs the script on every rank).
Every rank must call `Context.save_checkpoint` and `Context.load_checkpoint` (they are
collective); `Context.report` counts on rank 0 (the others' reports are ignored).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dptrain.worker.environment import CHECKPOINT_DIR, RESUME

__all__ = ["init", "Context", "Launch", "set_launch", "run_entrypoint", "entrypoint_script"]


@dataclass
class Launch:
    """What ``python -m dptrain.worker`` knows when it runs a job's ``entrypoint``: the
    context the script's `init` returns is built from it (not from the environment).

    Attributes:
        comm: the job's communicator.
        reporters: this rank's reporters (console and coordinator).
        checkpoint_dir: the job's checkpoint directory, or None.
        resume: continue from the newest intact checkpoint there.
        spec: the job spec as plain data (recorded in every checkpoint).
        keep: how many checkpoints to keep.
    """

    comm: Any
    reporters: list[Any]
    checkpoint_dir: str | None
    resume: bool
    spec: dict[str, Any] = field(default_factory=dict)
    keep: int = 3


_launch: Launch | None = None
_context: Context | None = None


def set_launch(launch: Launch | None) -> None:
    """Hand a job's launch to the next `init` (``python -m dptrain.worker`` does)."""
    global _launch, _context
    _launch, _context = launch, None


def _local_rank(rank: int) -> int:
    for name in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return rank


def init() -> Context:
    """The context of this rank (made once per process; later calls return the same).

    Returns:
        The `Context`. Started without a job (``mpiexec -n 2 python train.py``), it reads
        `CHECKPOINT_DIR` and `RESUME` from the environment, reports to the coordinator when
        ``DPTRAIN_COORDINATOR`` is set, and prints the final metrics when the script exits.
    """
    global _context
    if _context is not None:
        return _context
    if _launch is not None:
        _context = Context(_launch)
        return _context
    from dptrain.worker.comm import Communicator
    from dptrain.worker.events import build_reporters

    comm = Communicator()
    launch = Launch(comm, build_reporters(comm.rank, os.environ, progress=False),
                    os.environ.get(CHECKPOINT_DIR) or None, os.environ.get(RESUME) == "1")
    _context = Context(launch, owns_reporters=True)
    atexit.register(_context.finish)
    return _context


class Context:
    """One rank's view of its job (build it with `init`).

    Attributes:
        rank: this process's rank, ``0 .. world_size - 1``.
        world_size: the number of ranks.
        local_rank: the rank among the ranks on this host (picks the GPU).
        comm: the `Communicator` (for `DistributedDataParallel` and collectives).
        device: ``engine.Device`` this rank computes on (`dptrain.worker.train.rank_device`):
            ``cuda:<local_rank % GPUs>`` for a job's ``cuda`` (or ``auto`` with a GPU), else
            the CPU.
        allreduce: the job's ``allreduce`` (``auto`` by default), for
            ``DistributedDataParallel(..., allreduce=ctx.allreduce)``: how GPU gradients are
            reduced (`dptrain.worker.comm_device`), or ``shared_memory`` / ``mpi`` for CPU
            ones (``auto``: the shared window on one node where ``/dev/shm`` has room).
        checkpoint_dir: where checkpoints go, or None (then none are written).
        resume: the checkpoint the run resumes from, as `load_checkpoint` returns it, or None.
        args: the script's arguments (``sys.argv[1:]``).
    """

    def __init__(self, launch: Launch, owns_reporters: bool = False):
        from dptrain import engine

        self._launch, self._owns_reporters = launch, owns_reporters
        self.comm = launch.comm
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.local_rank = _local_rank(self.rank)
        from dptrain.worker.train import rank_device

        self.device: engine.Device = rank_device(launch.spec.get("device", "cpu"), self.comm)
        self.allreduce: str = launch.spec.get("allreduce", "auto")
        self.checkpoint_dir = launch.checkpoint_dir
        self.args = list(sys.argv[1:])
        self.last_step: int | None = None  # reported
        self.last_checkpoint: str | None = None
        self._checkpoint_step: int | None = None
        self.metrics: dict[str, Any] = {}
        self._epoch = 0
        self._finished = False
        self.resume: dict[str, Any] | None = None
        # Restored by `load_checkpoint`, not here: a script seeds (``engine.manual_seed``) and
        # builds its model after `init`, which would otherwise start the streams again.
        self._rng_state: dict | None = None
        if launch.resume and launch.checkpoint_dir:
            self.resume = self._read_latest()

    # ------------------------------------------------------------ reporting

    def _emit(self, event: str, *args: Any) -> None:
        for reporter in self._launch.reporters:
            getattr(reporter, event)(*args)

    def report(self, step: int, loss: float | None = None, **metrics: Any) -> None:
        """Report progress at `step` (rank 0's report counts; the others' are ignored).

        Args:
            step: the optimizer steps taken so far.
            loss: the loss at this step.
            metrics: further numbers (``accuracy=0.93``, ``lr=0.1`` ...).
        """
        if self.rank != 0:
            return
        values = {**({} if loss is None else {"loss": float(loss)}),
                  **{k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}}
        self.last_step, self.metrics = int(step), {**self.metrics, **values}
        self._emit("on_step", int(step), {"epoch": self._epoch, "samples_per_s": 0.0,
                                          **values})
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in values.items())
        print(f"step {step}: {shown}", flush=True)

    def epochs(self, n: int, *samplers: Any) -> Iterator[int]:
        """The epochs still to run, each sampler's epoch set before its epoch starts.

        Args:
            n: the number of epochs of the whole run.
            samplers: `DistributedSampler` (anything with ``set_epoch``) to advance.

        Yields:
            ``0 .. n-1``, or after a resume the epochs after the checkpoint's.
        """
        start = 0 if self.resume is None else int(self.resume.get("epoch", -1)) + 1
        for epoch in range(start, n):
            self._epoch = epoch
            for sampler in samplers:
                sampler.set_epoch(epoch)
            yield epoch

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> str | None:
        """Write a checkpoint of `state` at `step` (every rank calls it; rank 0 writes).

        The format and storage are a declarative job's: ``step-NNNNNNNN/`` with
        ``model.safetensors``, ``optimizer.safetensors`` and ``manifest.json`` written last,
        sha256-verified, atomic; under a coordinator it is uploaded as it is written.

        Args:
            state: ``{"model": module or state_dict, "optimizer": optimizer or state_dict
                (optional), ...}``; the other entries must be JSON data and come back from
                `load_checkpoint`.
            step: the optimizer steps taken.

        Returns:
            The checkpoint's directory on rank 0; None elsewhere or without a checkpoint dir.
        """
        from dptrain import engine
        from dptrain.worker import checkpoint as ckpt

        if self.checkpoint_dir is None:
            return None
        rng = (self.comm.allgather_object(engine.get_rng_state()) if self.world_size > 1
               else [engine.get_rng_state()])
        if self.rank != 0:
            return None
        model, optimizer = state["model"], state.get("optimizer")
        extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        info = {"epoch": self._epoch, "world_size": self.world_size, "spec": self._launch.spec,
                "rng": {"engine": rng}, "user": extra,
                "metrics": {k: v for k, v in self.metrics.items()
                            if isinstance(v, (int, float)) and math.isfinite(v)}}
        path = ckpt.write_checkpoint(
            self.checkpoint_dir, int(step), _state_dict(model),
            _state_dict(optimizer) if optimizer is not None else {"state": {},
                                                                   "param_groups": []}, info)
        ckpt.prune_checkpoints(self.checkpoint_dir, self._launch.keep)
        self.last_checkpoint, self._checkpoint_step = path, int(step)
        self._emit("on_checkpoint", int(step), path)
        return path

    def _read_latest(self) -> dict[str, Any] | None:
        from dptrain.worker import checkpoint as ckpt

        found = None
        if self.rank == 0:
            latest = ckpt.load_latest(self.checkpoint_dir, log=lambda line: self._emit(
                "on_log", line))
            if latest is not None:
                m = latest.manifest
                found = {**m.get("user", {}), "step": latest.step, "epoch": m.get("epoch", 0),
                         "model": latest.model_state, "optimizer": latest.optimizer_state,
                         "rng": m.get("rng", {}).get("engine"), "path": latest.path}
        if self.world_size > 1:
            found = self.comm.broadcast_object(found)
        if found is None:
            return None
        states = found.pop("rng")
        if states and len(states) == self.world_size:  # the same ranks: each its own stream
            self._rng_state = states[self.rank]
        self._epoch = int(found["epoch"])
        if self.rank == 0:
            self.last_checkpoint, self._checkpoint_step = found["path"], found["step"]
        return found

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint this run resumes from (every rank gets the same).

        Returns:
            ``{"step", "epoch", "model": state_dict, "optimizer": state_dict, "path", ...}``
            with the other entries `save_checkpoint` was given; None when the run starts
            fresh (no ``--resume``, or no intact checkpoint). The first call also restores
            every generator (host and devices) to its state at the checkpoint, so call it after
            ``engine.manual_seed`` and building the model, before drawing anything else.
        """
        if self._rng_state is not None:
            from dptrain import engine

            engine.set_rng_state(self._rng_state)
            self._rng_state = None
        return self.resume

    # ------------------------------------------------------------ the end

    def finish(self, status: str = "completed") -> dict[str, Any]:
        """End the run: the final metrics go to every reporter (on rank 0, one JSON line on
        stdout). Called for you when the script returns.

        Returns:
            The final metrics: ``status``, ``step`` (the last checkpoint's, else the last
            reported), ``world_size``, ``checkpoint`` and the last reported metrics.
        """
        if self._finished:
            return {}
        self._finished = True
        # The step is the last checkpoint's when there is one: a coordinator keeps it as the
        # run's result (a run that resumes at its end writes no new one).
        step = self._checkpoint_step if self._checkpoint_step is not None else self.last_step
        final = {**self.metrics, "status": status, "step": step or 0,
                 "epoch": self._epoch, "world_size": self.world_size,
                 "checkpoint": self.last_checkpoint,
                 "name": self._launch.spec.get("name", os.path.basename(sys.argv[0]))}
        if self.rank == 0:
            self._emit("on_end", final)
        if self._owns_reporters:
            for reporter in self._launch.reporters:
                reporter.close()
        return final


def _state_dict(value: Any) -> dict[str, Any]:
    return value.state_dict() if hasattr(value, "state_dict") else dict(value)


def entrypoint_script(entrypoint: str, code_dir: str) -> tuple[str, list[str]]:
    """The script a spec's ``entrypoint`` names, and its arguments.

    Args:
        entrypoint: ``train.py --lr 0.1``, split as a shell would.
        code_dir: the directory the script's path is relative to.

    Returns:
        ``(absolute script path, arguments)``.

    Raises:
        JobSpecError: naming ``entrypoint`` when the script is not a file there.
    """
    import shlex

    from dptrain.worker.spec_errors import FieldError, JobSpecError

    words = shlex.split(entrypoint)
    script = os.path.normpath(os.path.join(code_dir, words[0]))
    if not os.path.isfile(script):
        raise JobSpecError([FieldError("entrypoint", f"must name a script in the code "
                                                     f"directory ({code_dir})", words[0])])
    return script, words[1:]


def run_entrypoint(entrypoint: str, code_dir: str, launch: Launch) -> dict[str, Any]:
    """Run a job's own training script on this rank, as ``python SCRIPT ARGS`` would.

    Args:
        entrypoint: the spec's ``entrypoint``: the script (relative to `code_dir`) and its
            arguments, split as a shell would (``train.py --lr 0.1``).
        code_dir: the job's code directory (already first on ``sys.path``).
        launch: what the script's `init` returns a context of.

    Returns:
        The final metrics (`Context.finish`; empty on ranks other than 0 ... as it reports).

    Raises:
        JobSpecError: naming ``entrypoint`` when the script is not a file there.
        SystemExit: the script's own, when it exits with a non-zero status.
    """
    import runpy
    import signal

    script, args = entrypoint_script(entrypoint, code_dir)
    # A script has no checkpoint-on-SIGTERM of its own: SIGTERM ends it (exit 143, as a
    # preemption), and it resumes from its last checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_launch(launch)
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        return init().finish()
    finally:
        sys.argv = argv
        set_launch(None)
