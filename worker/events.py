"""What the trainer tells the world: a small reporter interface, and the console reporter.

The trainer calls, on every rank, each reporter that `build_reporters` gave that rank:
``on_start(info)``, ``on_step(step, metrics)`` after every optimizer step, ``on_eval(step,
metrics)``, ``on_checkpoint(step, path)``, ``on_log(line)`` for human-readable messages, and
``on_end(metrics)`` once. Metrics are global (all-reduced over ranks), so one rank reporting
is enough; the console reporter is on rank 0 only.

The coordinator's plug-in: when the environment variable ``DPTRAIN_COORDINATOR`` is set (the
coordinator's address, `environment.COORDINATOR`), the worker loads the module named by
`COORDINATOR_REPORTER_MODULE` (`load_reporter_plugin`) and calls the `ReporterPlugin` interface
defined here: `build_reporters` appends its ``create_reporter(...)``, whose `Reporter` turns
progress events into reports and heartbeats and uploads each checkpoint ``on_checkpoint``
names, and `fetch_resume_checkpoint` asks it for the job's latest checkpoint before a resumed
run. The worker owns this interface and names the plug-in only by a string: it never imports
the coordinator, and nothing imports grpc unless the coordinator launched the job.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

from dptrain.worker.environment import COORDINATOR

__all__ = ["Reporter", "ConsoleReporter", "ReporterPlugin", "build_reporters",
           "load_reporter_plugin", "fetch_resume_checkpoint", "fetch_code",
           "COORDINATOR_REPORTER_MODULE"]

COORDINATOR_REPORTER_MODULE = "dptrain.coordinator.client.worker_reporter"
"""The module implementing `ReporterPlugin` over gRPC, imported by name when the job runs
under a coordinator."""


class Reporter:
    """Base class: every event is a no-op; override the ones you need."""

    def on_start(self, info: dict[str, Any]) -> None:
        """The job is about to take its first step.

        Args:
            info: name, spec_hash, world_size, start_step, total_steps, steps_per_epoch,
                train_samples, validation_samples, task, resumed_from (a path or None).
        """

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        """An optimizer step finished.

        Args:
            step: steps taken so far (1 after the first).
            metrics: epoch, loss, accuracy (classification and tokens), lr, samples,
                samples_per_s — averaged over all ranks' shards of the global batch.
        """

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Validation ran after `step`.

        Args:
            step: steps taken so far.
            metrics: val_loss, val_accuracy (when the task has one), val_samples.
        """

    def on_checkpoint(self, step: int, path: str) -> None:
        """A checkpoint was written (rank 0 writes them).

        Args:
            step: its step.
            path: its directory.
        """

    def on_log(self, line: str) -> None:
        """A human-readable message (resumed from, fallbacks, preemption ...).

        Args:
            line: one line of text.
        """

    def on_end(self, metrics: dict[str, Any]) -> None:
        """The run ended (completed, preempted or diverged).

        Args:
            metrics: the final metrics; ``status`` says how it ended.
        """

    def close(self) -> None:
        """Release resources (the trainer calls it last, even after an error)."""


class ReporterPlugin(Protocol):
    """What a module reporting to a coordinator provides (the one `load_reporter_plugin` loads).

    Progress and heartbeats travel through the `Reporter` it creates (``on_step``, ``on_eval``,
    ``on_log``, ``on_end``: a heartbeat says training made progress), checkpoint uploads too
    (``on_checkpoint`` names a directory written by ``worker.checkpoint``); the resume fetch is
    a function of its own, called before training starts.
    """

    def create_reporter(self, address: str, *, rank: int,
                        environ: Mapping[str, str]) -> Reporter | None:
        """The reporter of rank `rank`, or None for a rank that should not report.

        Args:
            address: the coordinator's ``host:port`` (`environment.COORDINATOR`).
            rank: this process's rank.
            environ: the variables of `dptrain.worker.environment`.
        """

    def fetch_resume_checkpoint(self, dest_dir: str | os.PathLike,
                                environ: Mapping[str, str] | None = None) -> str | None:
        """Put the job's latest intact checkpoint into `dest_dir` (rank 0, before training).

        Args:
            dest_dir: the worker's checkpoint directory.
            environ: the variables of `dptrain.worker.environment` (default: ``os.environ``).

        Returns:
            The checkpoint's directory, or None when the job has none yet.
        """

    def fetch_code(self, sha256: str, target: str | os.PathLike,
                   environ: Mapping[str, str] | None = None) -> str:
        """Fetch the job's code archive, verify `sha256` and unpack it safely into `target`
        (every rank, before the job's modules are imported).

        Returns:
            `target`.

        Raises:
            CodeArchiveError: the bytes fail `sha256` or the archive is unsafe (the job
                fails at once: ``worker.job_code.code_directory``).
        """


def load_reporter_plugin() -> ReporterPlugin:
    """Import the coordinator's reporter plug-in (`COORDINATOR_REPORTER_MODULE`).

    Returns:
        The module.

    Raises:
        ImportError: it cannot be imported (grpc missing, ...).
    """
    return importlib.import_module(COORDINATOR_REPORTER_MODULE)


def fetch_code(sha256: str, target: str | os.PathLike,
               environ: Mapping[str, str] | None = None) -> str:
    """Through the plug-in: fetch the job's code, verify its sha256, unpack it into `target`.

    Args:
        sha256: the digest the job's spec names.
        target: the directory to create (an existing one is the same archive's, kept).
        environ: the environment (default: ``os.environ``).

    Returns:
        `target`.
    """
    return load_reporter_plugin().fetch_code(sha256, target, environ)


def fetch_resume_checkpoint(dest_dir: str | os.PathLike,
                            environ: Mapping[str, str] | None = None) -> str | None:
    """Through the plug-in: put the job's latest intact checkpoint into `dest_dir`.

    Args:
        dest_dir: the worker's checkpoint directory.
        environ: the environment (default: ``os.environ``).

    Returns:
        The checkpoint's directory, or None when the job has none yet.
    """
    return load_reporter_plugin().fetch_resume_checkpoint(dest_dir, environ)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/Infinity
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class ConsoleReporter(Reporter):
    """Rank 0's console: a tqdm progress bar (loss, accuracy, samples/s) and messages on
    stderr, and the final metrics as one JSON line on stdout.

    Args:
        progress: show the progress bar (messages and the JSON line appear either way).
        stream: where the bar and messages go (default: stderr).
        out: where the final JSON line goes (default: stdout).
    """

    def __init__(self, progress: bool = True, stream: TextIO | None = None,
                 out: TextIO | None = None):
        self.progress = progress
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self._bar = None

    def on_start(self, info: dict[str, Any]) -> None:
        self.on_log(f"job {info['name']}: {info['world_size']} rank(s), steps "
                    f"{info['start_step']}..{info['total_steps']} ({info['steps_per_epoch']} per "
                    f"epoch), {info['train_samples']} training / {info['validation_samples']} "
                    f"validation samples")
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=info["total_steps"], initial=info["start_step"],
                             file=self.stream, unit="step", dynamic_ncols=True, mininterval=0.25,
                             desc=info["name"], leave=True)

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            return
        postfix = {"loss": f"{metrics['loss']:.4f}"}
        if metrics.get("accuracy") is not None:
            postfix["acc"] = f"{metrics['accuracy']:.3f}"
        postfix["samples/s"] = f"{metrics['samples_per_s']:.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in metrics.items()]
        self.on_log(f"step {step}: " + "  ".join(parts))

    def on_checkpoint(self, step: int, path: str) -> None:
        self.on_log(f"step {step}: checkpoint written to {path}")

    def on_log(self, line: str) -> None:
        # One write per line, newline included: under mpiexec, stderr and stdout (the final
        # JSON line) often share one file, and a line written in two pieces can be split by
        # the other stream's output.
        if self._bar is not None:
            with self._bar.external_write_mode(file=self.stream):
                _write_line(self.stream, line)
        else:
            _write_line(self.stream, line)

    def on_end(self, metrics: dict[str, Any]) -> None:
        self.close()
        _write_line(self.out, json.dumps(_json_safe(metrics), sort_keys=True))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _write_line(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def build_reporters(rank: int, environ: Mapping[str, str] | None = None,
                    progress: bool = True) -> list[Reporter]:
    """The reporters of one rank: the console on rank 0, and the coordinator's reporter when
    ``DPTRAIN_COORDINATOR`` is set.

    Args:
        rank: this process's rank.
        environ: the environment to read (default: ``os.environ``).
        progress: whether rank 0's console shows a progress bar.

    Returns:
        The reporters, possibly none (ranks other than 0, outside a coordinator).
    """
    environ = os.environ if environ is None else environ
    reporters: list[Reporter] = [ConsoleReporter(progress=progress)] if rank == 0 else []
    address = environ.get(COORDINATOR)
    if address:
        reporter = load_reporter_plugin().create_reporter(address, rank=rank, environ=environ)
        if reporter is not None:
            reporters.append(reporter)
    return reporters
