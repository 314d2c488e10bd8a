"""The training loop: every rank runs the model on its contiguous shard of each global batch.

The loop calls the model, the optimizer and `DistributedDataParallel`, and reaches the other
ranks only through the `Communicator`; it never calls MPI itself. One step::

    x, y = train_set.gather(batch[rank * b:(rank + 1) * b])   # this rank's shard
    loss = loss_fn(ddp(x), y)
    start all-reduce [loss sum, correct, count, stop?]         # metrics and preemption
    optimizer.zero_grad(); loss.backward()                     # DDP: the mean gradient
    non-finite loss -> stop, naming the step (before the update: parameters stay finite)
    optimizer.step(); scheduler.step()

Exit codes (`run_job` returns them in `TrainResult.exit_code`; ``python -m dptrain.worker`` exits
with them):

===  ===================================================================================
0    the run completed
1    a rank raised: its error is printed and the whole job is aborted (`EXIT_FAILED`)
2    the job cannot start: invalid spec, data, model module or checkpoint (`EXIT_INVALID`)
3    the loss became non-finite; the message names the step (`EXIT_DIVERGED`)
4    no space left to write a checkpoint (ENOSPC, EDQUOT): rank 0 says where, in one line,
     and aborts every rank; the checkpoints written before are intact (`EXIT_DISK_FULL`)
143  preempted: SIGTERM arrived, the current step finished and a checkpoint was written
     (`EXIT_PREEMPTED`, 128 + SIGTERM, what a shell reports for a process ended by SIGTERM)
===  ===================================================================================
"""

from __future__ import annotations

import collections
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import dptrain.engine.functional as F
from dptrain import engine
from dptrain.engine.backend import cuda_device_for, use_device
from dptrain.engine.optim import lr_scheduler
from dptrain.worker import checkpoint as ckpt
from dptrain.worker.data import (
    DataError,
    Dataset,
    Subset,
    epoch_batches,
    load_dataset,
    train_validation_split,
)
from dptrain.worker.events import Reporter
from dptrain.worker.exit_codes import (
    EXIT_DISK_FULL,
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PREEMPTED,
)
from dptrain.worker.job_code import resolve_loss
from dptrain.worker.spec import (
    MAX_STEPS,
    SCHEDULERS,
    FieldError,
    JobSpec,
    JobSpecError,
    build_model,
    check_shards,
    spec_hash,
    trajectory_differences,
)

__all__ = ["run_job", "TrainResult", "JobFailed", "agree", "install_preemption_handler",
           "EXIT_OK", "EXIT_FAILED", "EXIT_INVALID", "EXIT_DIVERGED", "EXIT_DISK_FULL",
           "EXIT_PREEMPTED"]

_EVAL_BATCH = 512
_LOSS_WINDOW = 100  # the final train loss/accuracy average the last this many steps

_preempted = threading.Event()


def install_preemption_handler() -> None:
    """Make SIGTERM ask the loop to stop after the current step (and checkpoint) instead of
    killing the process. Safe to call more than once; only from the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _preempted.set())


class JobFailed(Exception):
    """An error every rank raised together (so the ranks can exit without an abort).

    Args:
        message: what went wrong, one line.
        exit_code: the process exit code it maps to.
    """

    def __init__(self, message: str, exit_code: int = EXIT_INVALID):
        super().__init__(message)
        self.exit_code = exit_code


def agree(comm: Any, fn: Callable[[], Any], errors: tuple[type[BaseException], ...],
          exit_code: int = EXIT_INVALID) -> Any:
    """Run `fn` on every rank and raise `JobFailed` on every rank if it failed on any.

    Args:
        comm: the job's communicator.
        fn: the work, e.g. reading the job file or the data.
        errors: the exception types that count as the job's fault (others propagate).
        exit_code: the exit code of the `JobFailed`.

    Returns:
        What `fn` returned.
    """
    try:
        result, message = fn(), None
    except errors as e:
        result, message = None, str(e)
    messages = comm.allgather_object(message) if comm.size > 1 else [message]
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, text = failed[0]
        raise JobFailed(text if len(set(m for _, m in failed)) == 1 else f"rank {rank}: {text}",
                        exit_code)
    return result


@dataclass
class TrainResult:
    """How a run ended.

    Attributes:
        status: ``completed``, ``preempted`` or ``diverged``.
        exit_code: the process exit code for it (see the module docstring).
        metrics: the final metrics (what the JSON line holds).
        checkpoint: the last checkpoint written, or None.
    """

    status: str
    exit_code: int
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


# ---------------------------------------------------------------- building blocks

def rank_device(device: str, comm: Any) -> engine.Device:
    """This rank's device for a job's ``device``: for ``cuda`` (and ``auto`` where CuPy sees a
    GPU) the GPU of its index among the ranks of its node, modulo the GPUs visible there.

    Collective: every rank of `comm` calls it (it splits `comm` by node when not ``cpu``).

    Raises:
        JobFailed: ``cuda`` without CuPy or without a visible GPU (the message says which).
    """
    if device == "cpu":
        return engine.Device("cpu")
    local_rank = comm.split_shared().rank  # collective: every rank asks, whatever it finds
    if device == "auto" and not engine.cupy_available():
        return engine.Device("cpu")
    try:
        gpu = cuda_device_for(local_rank)
    except RuntimeError as e:
        raise JobFailed(f"device: {device!r} on rank {comm.rank}: {e}") from None
    use_device(gpu)  # pragma: no cover - needs a GPU (CuPy works on the current one)
    return gpu  # pragma: no cover


def _optimizer(spec: JobSpec, params: list) -> engine.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return engine.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    cls = engine.optim.Adam if o.name == "adam" else engine.optim.AdamW
    return cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _scheduler(spec: JobSpec, optimizer: Any) -> lr_scheduler.LRScheduler | None:
    if spec.scheduler is None:
        return None
    cls = getattr(lr_scheduler, SCHEDULERS[spec.scheduler.name])
    return cls(optimizer, **spec.scheduler.args)


def _rank_seed(seed: int, rank: int) -> int:
    """Each rank's own stream (dropout masks), derived from the job's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def _loss(task: str, out: Any, y: engine.Tensor, loss_fn: Callable[..., Any] | None = None
          ) -> tuple[engine.Tensor, Any, int]:
    """(mean loss, number correct as a Tensor or None, number of items averaged over); a
    job's own `loss_fn` is the mean over the batch's samples."""
    if isinstance(out, tuple):  # models that also return a state (recurrent)
        out = out[0]
    if loss_fn is not None:
        correct = None
        if task == "classification" and out.ndim == 2:
            correct = (out.detach().argmax(dim=1) == y).sum()
        return loss_fn(out, y), correct, y.shape[0]
    if task == "regression":
        target = y.reshape(*out.shape) if y.numel() == out.numel() else y
        return F.mse_loss(out, target), None, out.numel()
    if task == "tokens":
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    correct = (out.detach().argmax(dim=1) == y).sum()
    return F.cross_entropy(out, y), correct, y.numel()


@dataclass
class _Position:
    step: int = 0       # optimizer steps taken
    epoch: int = 0      # the epoch the next step belongs to
    in_epoch: int = 0   # batches of that epoch already taken


# ---------------------------------------------------------------- the run

class _Run:
    """One rank's run of one job (see `run_job`)."""

    def __init__(self, spec: JobSpec, comm: Any, checkpoint_dir: str | None,
                 reporters: list[Reporter]):
        self.spec, self.comm, self.dir = spec, comm, checkpoint_dir
        self.rank, self.size = comm.rank, comm.size
        self.reporters = reporters
        self.hash = spec_hash(spec)
        self.local_batch = spec.batch_size // self.size
        self.pos = _Position()
        self.last_checkpoint: str | None = None
        self.saved_step = -1  # the step of the last checkpoint (known on every rank)
        self.steps_run = 0    # steps this process took (the first pays for warm-up)
        self.last_eval: dict[str, Any] = {}
        self.window: collections.deque = collections.deque(maxlen=_LOSS_WINDOW)
        self.train_time, self.timed_samples = 0.0, 0

    def emit(self, event: str, *args: Any) -> None:
        for r in self.reporters:
            getattr(r, event)(*args)

    def log(self, line: str) -> None:
        self.emit("on_log", line)

    # ------------------------------------------------------------ set-up
    def setup(self) -> None:
        spec = self.spec
        self.device = rank_device(spec.device, self.comm)
        self.loss_fn = None if spec.loss is None else agree(
            self.comm, lambda: resolve_loss(spec.loss), (JobSpecError,))
        data: Dataset = agree(self.comm, lambda: load_dataset(spec.dataset.name,
                                                              spec.dataset.args),
                              (DataError, OSError, JobSpecError))
        train_idx, val_idx = train_validation_split(len(data), spec.dataset.validation_fraction,
                                                    spec.seed)
        self.train_set, self.val_set = Subset(data, train_idx), Subset(data, val_idx)
        self.task = data.task
        self.steps_per_epoch = len(self.train_set) // spec.batch_size
        if self.steps_per_epoch == 0:
            raise JobFailed(str(JobSpecError([FieldError(
                "batch_size", f"must not exceed the {len(self.train_set)} training samples",
                spec.batch_size)])))
        limits = [spec.max_steps or math.inf, (spec.epochs or math.inf) * self.steps_per_epoch]
        self.total_steps = int(min(limits))
        if self.total_steps > MAX_STEPS:  # only epochs can ask for that many (spec rules)
            raise JobFailed(str(JobSpecError([FieldError(
                "epochs", f"must make at most {MAX_STEPS} steps, at {self.steps_per_epoch} per "
                "epoch (or give max_steps)", spec.epochs)])))
        engine.manual_seed(spec.seed)  # the same initial parameters on every rank
        self.model = agree(self.comm, lambda: build_model(spec.model.name, spec.model.args),
                           (ValueError, TypeError)).to(self.device)
        self.optimizer = _optimizer(spec, list(self.model.parameters()))
        self.scheduler = _scheduler(spec, self.optimizer)
        engine.manual_seed(_rank_seed(spec.seed, self.rank))

    def restore(self) -> str | None:
        """Load the newest intact checkpoint (rank 0 reads it, every rank receives it)."""
        payload, error = None, None
        if self.rank == 0:
            found = ckpt.load_latest(self.dir, log=self.log)
            if found is not None:
                diff = trajectory_differences(found.manifest.get("spec", {}), self.spec)
                if diff:
                    error = (f"checkpoint {found.path} was written by a job that differs in "
                             f"{', '.join(diff)}; resuming would not continue that run (use "
                             f"another --checkpoint-dir, or restore those fields)")
                else:
                    payload = {
                        "path": found.path, "manifest": found.manifest,
                        "model": {k: t.numpy() for k, t in found.model_state.items()},
                        "optimizer": {
                            "param_groups": found.optimizer_state["param_groups"],
                            "state": {i: {k: (v.numpy() if isinstance(v, engine.Tensor) else v)
                                          for k, v in s.items()}
                                      for i, s in found.optimizer_state["state"].items()}}}
        if self.size > 1:
            payload, error = self.comm.broadcast_object((payload, error))
        if error:
            raise JobFailed(error)
        if payload is None:
            self.log(f"no checkpoint to resume from in {self.dir}; starting from step 0")
            return None
        m = payload["manifest"]
        self.model.load_state_dict({k: engine.tensor(v, device=self.device)
                                    for k, v in payload["model"].items()})
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and m.get("scheduler") is not None:
            self.scheduler.load_state_dict(m["scheduler"])
        self.pos = _Position(int(m["step"]), int(m["epoch"]), int(m["position"]))
        # Already on disk: never rewritten, and the run's checkpoint until a newer one is (a
        # run resumed at its final step ends with it, and its final metrics must name it).
        self.saved_step, self.last_checkpoint = self.pos.step, payload["path"]
        states = m["rng"]["engine"]
        if len(states) == self.size:
            engine.set_rng_state(states[self.rank])
        else:
            self.log(f"the checkpoint was written by {len(states)} rank(s), this job has "
                     f"{self.size}: each rank's random stream restarts from the seed, so the "
                     f"run will not be bit-identical to an uninterrupted one")
        self.log(f"resumed from {payload['path']} at step {self.pos.step} (epoch "
                 f"{self.pos.epoch}, batch {self.pos.in_epoch})")
        return payload["path"]

    # ------------------------------------------------------------ work
    def evaluate(self) -> dict[str, Any]:
        n = len(self.val_set)
        if n == 0:
            return {}
        shard = np.array_split(np.arange(n), self.size)[self.rank]
        totals = np.zeros(3)
        self.model.eval()
        with engine.no_grad():
            for i in range(0, len(shard), _EVAL_BATCH):
                x, y = self.val_set.gather(shard[i:i + _EVAL_BATCH])
                loss, correct, count = _loss(self.task, self.model(self._tensor(x)),
                                             self._tensor(y), self.loss_fn)
                totals += (loss.item() * count, 0 if correct is None else correct.item(), count)
        self.model.train()
        if self.size > 1:
            self.comm.allreduce_(totals, op="sum")
        metrics: dict[str, Any] = {"val_loss": totals[0] / totals[2]}
        if self.task != "regression":
            metrics["val_accuracy"] = totals[1] / totals[2]
        metrics["val_samples"] = n
        self.last_eval = metrics
        self.emit("on_eval", self.pos.step, metrics)
        return metrics

    def save(self) -> str | None:
        if self.dir is None:
            return None
        self.saved_step = self.pos.step
        states = (self.comm.allgather_object(engine.get_rng_state()) if self.size > 1
                  else [engine.get_rng_state()])
        if self.rank != 0:
            return None
        info = {
            "epoch": self.pos.epoch, "position": self.pos.in_epoch,
            "samples_seen": self.pos.step * self.spec.batch_size, "world_size": self.size,
            "spec_hash": self.hash, "spec": self.spec.to_dict(),
            "rng": {"engine": states, "data_order": {
                "sampler": "DistributedSampler", "seed": self.spec.seed,
                "epoch": self.pos.epoch, "position": self.pos.in_epoch}},
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "metrics": {**self._train_metrics(), **self.last_eval},
        }
        path = ckpt.write_checkpoint(self.dir, self.pos.step, self.model.state_dict(),
                                     self.optimizer.state_dict(), info)
        ckpt.prune_checkpoints(self.dir, self.spec.checkpoint.keep)
        self.last_checkpoint = path
        self.emit("on_checkpoint", self.pos.step, path)
        return path

    def _tensor(self, array: np.ndarray) -> engine.Tensor:
        if self.device.type == "cpu":
            return engine.from_numpy(array)
        return engine.tensor(array, device=self.device)

    def _train_metrics(self) -> dict[str, Any]:
        if not self.window:
            return {}
        totals = np.sum(self.window, axis=0)
        out = {"loss": totals[0] / totals[2]}
        if self.task != "regression":
            out["accuracy"] = totals[1] / totals[2]
        return out

    def run(self, ddp: Any) -> TrainResult:
        spec, pos, rank, b = self.spec, self.pos, self.rank, self.local_batch
        every, eval_every = spec.checkpoint.every_steps, spec.eval_every
        stats = np.zeros(4)
        batches = epoch_batches(len(self.train_set), spec.batch_size, spec.seed, pos.epoch)
        status, stop_message = "completed", None
        while pos.step < self.total_steps:
            if pos.in_epoch == self.steps_per_epoch:
                pos.epoch, pos.in_epoch = pos.epoch + 1, 0
                batches = epoch_batches(len(self.train_set), spec.batch_size, spec.seed,
                                        pos.epoch)
            started = time.perf_counter()
            x, y = self.train_set.gather(batches[pos.in_epoch, rank * b:(rank + 1) * b])
            loss, correct, count = _loss(self.task, ddp(self._tensor(x)), self._tensor(y),
                                         self.loss_fn)
            stats[:] = (loss.item() * count, 0 if correct is None else correct.item(), count,
                        _preempted.is_set())
            # Started before backward, the metrics' all-reduce completes while DDP drives its
            # gradient buckets (every rank starts them in this same order).
            request = self.comm.iallreduce_(stats, op="sum") if self.size > 1 else None
            self.optimizer.zero_grad()
            loss.backward()
            if request is not None:
                request.wait()
            if not math.isfinite(stats[0]):
                status = "diverged"
                stop_message = (f"non-finite loss ({stats[0] / stats[2]}) at step "
                                f"{pos.step + 1} (epoch {pos.epoch}); stopping without "
                                f"applying that step")
                break
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            pos.step, pos.in_epoch = pos.step + 1, pos.in_epoch + 1
            self.window.append(stats[:3].copy())
            self.steps_run += 1
            if self.steps_run > 1:  # the first step pays for warm-up
                self.train_time += time.perf_counter() - started
                self.timed_samples += spec.batch_size
            metrics = {"epoch": pos.epoch, "loss": stats[0] / stats[2],
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "samples": pos.step * spec.batch_size,
                       "samples_per_s": self._rate()}
            if correct is not None:
                metrics["accuracy"] = stats[1] / stats[2]
            self.emit("on_step", pos.step, metrics)
            if eval_every and pos.step % eval_every == 0 and pos.step < self.total_steps:
                self.evaluate()
            if every and pos.step % every == 0 and pos.step < self.total_steps:
                self.save()
            if stats[3] > 0:
                status = "preempted"
                stop_message = (f"SIGTERM: stopped after step {pos.step}; " + (
                    "continue with --resume" if self.dir else
                    "no checkpoint written (no --checkpoint-dir)"))
                break
        if status != "diverged":
            if status == "completed":
                self.evaluate()
            if self.saved_step != pos.step:
                self.save()
        if stop_message:
            self.log(stop_message)
        return self._result(status)

    def _rate(self) -> float:
        return self.timed_samples / self.train_time if self.train_time > 0 else 0.0

    def _result(self, status: str) -> TrainResult:
        code = {"completed": EXIT_OK, "preempted": EXIT_PREEMPTED,
                "diverged": EXIT_DIVERGED}[status]
        metrics = {"status": status, "name": self.spec.name, "step": self.pos.step,
                   "epoch": self.pos.epoch, "world_size": self.size,
                   **self._train_metrics(), **self.last_eval,
                   "samples_per_s": self._rate(), "train_time_s": self.train_time,
                   "checkpoint": self.last_checkpoint, "spec_hash": self.hash}
        if self.dir is not None and self.size > 1:  # rank 0 wrote it; everyone reports it
            metrics["checkpoint"] = self.comm.broadcast_object(self.last_checkpoint)
        return TrainResult(status, code, metrics, metrics["checkpoint"])


def run_job(spec: JobSpec, comm: Any = None, checkpoint_dir: str | None = None,
            resume: bool = False, reporters: list[Reporter] | None = None) -> TrainResult:
    """Train `spec` on this rank, together with every other rank of `comm`.

    Every rank calls it with the same arguments. Rank 0 writes the checkpoints.

    Args:
        spec: the validated job.
        comm: a `worker.Communicator` (default: MPI's world).
        checkpoint_dir: where checkpoints go (None: none are written, and SIGTERM stops
            without one).
        resume: continue from the newest intact checkpoint in `checkpoint_dir`, if any.
        reporters: who hears of progress (default: none).

    Returns:
        How the run ended, with its exit code and final metrics.

    Raises:
        JobFailed: raised on every rank alike (bad data, batch size, checkpoint mismatch).
    """
    from dptrain.worker.comm import Communicator, cuda_aware_mpi
    from dptrain.worker.ddp import DistributedDataParallel

    comm = Communicator() if comm is None else comm
    install_preemption_handler()
    if (error := check_shards(spec.batch_size, comm.size)) is not None:
        raise JobFailed(str(error))
    if resume and checkpoint_dir is None:
        raise JobFailed("--resume needs a checkpoint directory (--checkpoint-dir)")
    run = _Run(spec, comm, checkpoint_dir, list(reporters or []))
    run.setup()
    if run.device.type == "cuda":  # hand MPI device buffers only where it can read them
        comm.cuda_aware = cuda_aware_mpi()
    resumed_from = run.restore() if resume else None
    try:
        ddp = DistributedDataParallel(run.model, comm, allreduce=spec.allreduce)
    except RuntimeError as e:  # e.g. allreduce 'nccl' where a rank cannot use it: every rank
        raise JobFailed(str(e)) from None
    run.emit("on_start", {
        "name": spec.name, "spec_hash": run.hash, "world_size": comm.size,
        "start_step": run.pos.step, "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch, "train_samples": len(run.train_set),
        "validation_samples": len(run.val_set), "task": run.task,
        "resumed_from": resumed_from})
    result = run.run(ddp)
    run.emit("on_end", result.metrics)
    return result
