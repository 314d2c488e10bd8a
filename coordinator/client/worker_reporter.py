"""The worker's side of the coordinator: progress reports, heartbeats, checkpoint transfers
(the calls themselves are `dptrain.coordinator.client.worker_client.WorkerClient`'s).

This module implements ``worker.events.ReporterPlugin`` over gRPC; the worker imports it by
name (``worker.events.COORDINATOR_REPORTER_MODULE``) when ``DPTRAIN_COORDINATOR`` is set, and it
loads no server module and no engine. `create_reporter` gives rank 0 a `CoordinatorReporter`
(metrics are global, so one rank reporting is enough), the other ranks None. ``python -m
dptrain.worker --resume`` calls `fetch_resume_checkpoint` on rank 0 before training, so the
worker's own resume code finds the job's latest intact checkpoint in its checkpoint directory.

The reporter never stops training, nor gives up on a checkpoint while the coordinator may
come back. Events wait in a bounded buffer while the coordinator is unreachable; a report it
refuses because the job is over is dropped. Each checkpoint is uploaded as it is
written, the training loop waiting, if the coordinator is reachable; otherwise it stays queued
and an upload thread retries (oldest first, backing off up to ``retry_interval``) until the
coordinator stores it, refuses it for good (the job is over, a file changed), or a newer
checkpoint replaced it on disk; so is the one a run ends with, even when an earlier attempt
wrote it (a run resumed at its final step). What is still queued at exit the coordinator
stores itself from the job's checkpoint directory (``server.ingest``). A dead token
(replaced by a newer launch) stops everything. Per-step metrics go at most every
``step_interval`` seconds (the newest step is never lost), everything else always; pending
events are sent every ``flush_interval`` seconds.

Heartbeats mean "training makes progress" (steps advance), not "the process exists": progress
reports carry it, and a heartbeat is sent only for progress no event carries (a log line, the
bytes of an upload the training loop waits for), at most ``heartbeat_interval`` after it. So a
rank stuck in a hung collective falls silent at once, and the coordinator's heartbeat timeout
ends the job that long after the last step. The runner passes that timeout to the workers
(``DPTRAIN_HEARTBEAT_TIMEOUT``): the heartbeat interval derives from it, and after that long
without progress rank 0 says so in the job's log.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dptrain.coordinator.api.limits import MAX_EVENTS_PER_REPORT
from dptrain.coordinator.api.records import EventKind
from dptrain.coordinator.client.client import ClientError
from dptrain.coordinator.client.worker_client import WorkerClient
from dptrain.worker.checkpoint_manifest import (
    MANIFEST,
)
from dptrain.worker.environment import COORDINATOR, read_worker_environment
from dptrain.worker.events import Reporter

__all__ = ["CoordinatorReporter", "create_reporter", "fetch_code", "fetch_resume_checkpoint"]

#: This token is dead (a newer launch replaced it) or the job is gone: stop everything.
_FATAL = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND"})
#: A progress report or heartbeat that would be refused again (a bad batch, or the job is
#: over): drop it and go on; checkpoint uploads are not affected.
_DROP_EVENTS = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION"})
#: The coordinator is unreachable, restarting or overloaded: try again later.
_RETRY = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL",
                    "ABORTED"})


def _stderr(line: str) -> None:
    print(f"dptrain worker: coordinator: {line}", file=sys.stderr, flush=True)


def _on_disk(checkpoint: str) -> bool:
    """Whether a checkpoint directory is still there (the worker prunes replaced ones)."""
    return (Path(checkpoint) / MANIFEST).is_file()


class CoordinatorReporter(Reporter):
    """Reports rank 0's progress to the coordinator (see the module docstring for the policy).

    Args:
        client: the job's `WorkerClient` (closed by `close`).
        rank: the rank reporting (recorded with log lines).
        step_interval: at most one per-step metrics event per this many seconds.
        flush_interval: seconds between sends of pending events.
        heartbeat_interval: at most this many seconds between the coordinator hearing of
            progress that no event carries (log lines, a long upload) and the progress.
        heartbeat_timeout: the coordinator's heartbeat timeout (None: none); after this long
            without progress the reporter says so in the log.
        retry_interval: the longest wait between tries of a checkpoint upload that failed
            because the coordinator was unreachable.
        max_pending: events kept while the coordinator is unreachable (oldest dropped).
        log: where the reporter's own troubles are written (default: stderr).
    """

    def __init__(self, client: WorkerClient, *, rank: int = 0, step_interval: float = 0.1,
                 flush_interval: float = 0.5, heartbeat_interval: float = 5.0,
                 heartbeat_timeout: float | None = None, retry_interval: float = 5.0,
                 max_pending: int = 10_000, log: Callable[[str], None] = _stderr):
        self.client = client
        self.rank = rank
        self.step_interval, self.flush_interval = step_interval, flush_interval
        self.heartbeat_interval, self.heartbeat_timeout = heartbeat_interval, heartbeat_timeout
        self.retry_interval = retry_interval
        self._log = log
        self._lock = threading.Lock()       # guards the fields below
        self._changed = threading.Condition(self._lock)  # uploads queued, or reachable again
        self._send_lock = threading.Lock()  # one report at a time, in order
        self._upload_lock = threading.Lock()  # one upload at a time, oldest first
        self._pending: collections.deque = collections.deque(maxlen=max_pending)
        self._held: dict[str, Any] | None = None  # the newest step's metrics, not yet queued
        self._last_step_queued = -float("inf")
        # Progress: when training last showed any (monotonic; None before it starts), at which
        # step, and the newest progress the coordinator has heard of, and when it heard.
        self._progress_at: float | None = None
        self._step: int | None = None
        self._heard_at = -float("inf")
        self._told_at = time.monotonic()
        self._stall_logged = False
        self._uploads: dict[str, int] = {}  # checkpoint directory -> step, not yet stored
        self._stored: set[str] = set()  # the checkpoint directories the coordinator stored
        self._retry_at = 0.0
        self._backoff = min(0.5, retry_interval)
        self._disabled: str | None = None
        self._unreachable = False  # the last call failed with a retryable error
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=target, name=name, daemon=True) for target, name
                         in ((self._run, "dptrain-reporter"), (self._upload_loop,
                                                               "dptrain-uploader"))]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------ Reporter events

    def on_start(self, info: dict[str, Any]) -> None:
        self._progress(int(info.get("start_step") or 0))
        keys = ("total_steps", "start_step", "steps_per_epoch", "train_samples",
                "validation_samples", "world_size")
        self._queue(EventKind.METRICS, {"step": int(info.get("start_step") or 0),
                                        **{k: info[k] for k in keys if k in info}})
        resumed = info.get("resumed_from")
        self._queue(EventKind.LOG, {"line": f"started: {info.get('world_size')} rank(s), steps "
                                    f"{info.get('start_step')}..{info.get('total_steps')}"
                                    + (f", resumed from {resumed}" if resumed else ""),
                                    "rank": self.rank})
        self.flush()

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        payload = {"step": step, **metrics}
        now = self._progress(step)
        with self._lock:
            if self._disabled:
                return
            if now - self._last_step_queued >= self.step_interval:
                self._pending.append((EventKind.METRICS, payload))
                self._last_step_queued, self._held = now, None
            else:
                self._held = payload

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self._progress(step)
        self._queue(EventKind.METRICS, {"step": step, **metrics})

    def on_log(self, line: str) -> None:
        # Progress, not content: the runner already streams every rank's output (tracebacks
        # included) from the job's log file as log events, so forwarding would duplicate it.
        self._progress()

    def on_checkpoint(self, step: int, path: str) -> None:
        """Upload the checkpoint now, while the training loop waits, when the coordinator is
        reachable; otherwise (or when that fails) the upload thread retries it."""
        self._progress(step)
        self.flush()
        with self._lock:
            if self._disabled:
                return
            self._uploads[path] = step
            now = not self._unreachable
            if not now:
                self._changed.notify_all()
        if now:
            self._upload_pending(training_waits=True)

    def on_end(self, metrics: dict[str, Any]) -> None:
        self._progress()
        self._queue(EventKind.METRICS, {**metrics, "step": int(metrics.get("step") or 0)})
        self.flush()
        # The checkpoint the run ends with must reach the coordinator, also when this process
        # did not write it: a run resumed at its final step writes nothing.
        final = metrics.get("checkpoint")
        with self._lock:
            offered = final in self._uploads or final in self._stored
        if final and not offered:
            self.on_checkpoint(int(metrics.get("step") or 0), final)

    def close(self) -> None:
        """Stop the background threads, send what is pending, close the connection.

        A coordinator that is unreachable is not waited for: checkpoints it has not received
        are then stored by the coordinator itself, from the job's checkpoint directory.
        """
        self._stop.set()
        with self._lock:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        if not self._unreachable:  # don't make a finished worker wait on a dead coordinator
            self.flush()
            self._upload_pending(training_waits=False)
        with self._lock:
            queued = [] if self._disabled else list(self._uploads.items())
        left = sorted(step for path, step in queued if _on_disk(path))
        if left:
            self._log(f"checkpoint(s) of step {', '.join(map(str, left))} not uploaded (the "
                      f"coordinator is unreachable): it stores them from the job's checkpoint "
                      f"directory")
        self.client.close()

    # ------------------------------------------------------------ progress

    def _progress(self, step: int | None = None) -> float:
        now = time.monotonic()
        self._progress_at = now
        if step is not None:
            self._step = step
        return now

    def _heard(self, progress_at: float | None) -> None:
        """A progress report or heartbeat carrying the progress of `progress_at` succeeded."""
        with self._lock:
            if progress_at is not None:
                self._heard_at = max(self._heard_at, progress_at)
            self._told_at = time.monotonic()
        self._reachable()

    def _check_stall(self) -> None:
        progress_at = self._progress_at
        if self.heartbeat_timeout is None or progress_at is None:
            return
        silent_for = time.monotonic() - progress_at
        if silent_for < self.heartbeat_timeout:
            self._stall_logged = False
        elif not self._stall_logged:
            self._stall_logged = True
            self._log(f"no training progress for {silent_for:.1f} s since step {self._step}: "
                      f"the coordinator ends the job after {self.heartbeat_timeout:g} s (a hung "
                      f"rank or collective?)")

    # ------------------------------------------------------------ sending events

    def _queue(self, kind: EventKind, payload: dict[str, Any]) -> None:
        with self._lock:
            if self._disabled:
                return
            if self._held is not None:
                self._pending.append((EventKind.METRICS, self._held))
                self._held = None
            self._pending.append((kind, payload))

    def flush(self) -> bool:
        """Send every pending event now (in batches).

        Returns:
            True when nothing is left pending.
        """
        with self._send_lock:
            while not self._disabled:
                progress_at = self._progress_at
                with self._lock:
                    if self._held is not None:
                        self._pending.append((EventKind.METRICS, self._held))
                        self._held = None
                    batch = [self._pending[i] for i in
                             range(min(len(self._pending), MAX_EVENTS_PER_REPORT))]
                if not batch:
                    return True
                try:
                    self.client.report_progress(batch)
                    self._heard(progress_at)
                except ClientError as e:
                    if e.code in _DROP_EVENTS:
                        self._warn_once(e, f"progress report refused, {len(batch)} event(s) "
                                           f"dropped: {e}")
                    else:
                        self._failed(e)
                        return False
                with self._lock:
                    for _ in range(min(len(batch), len(self._pending))):
                        self._pending.popleft()
            return False

    def _heartbeat(self) -> None:
        progress_at = self._progress_at
        try:
            self.client.heartbeat()
            self._heard(progress_at)
        except ClientError as e:
            if e.code in _DROP_EVENTS:
                self._warn_once(e, f"heartbeat refused: {e}")
                with self._lock:  # told, if refused: no need to say it again at once
                    self._told_at = time.monotonic()
            else:
                self._failed(e)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval) and not self._disabled:
            self._check_stall()
            with self._lock:
                busy = bool(self._pending) or self._held is not None
                unheard = self._progress_at is not None and self._progress_at > self._heard_at
                due = time.monotonic() - self._told_at >= self.heartbeat_interval
            if busy:
                self.flush()
            elif unheard and due:
                self._heartbeat()

    # ------------------------------------------------------------ uploading checkpoints

    def _upload_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop.is_set():
                    wait = self._retry_at - time.monotonic()
                    if self._uploads and not self._disabled and wait <= 0:
                        break
                    self._changed.wait(wait if self._uploads and wait > 0 else None)
                else:
                    return
            self._upload_pending(training_waits=False)

    def _upload_pending(self, training_waits: bool) -> None:
        """Upload the queued checkpoints, oldest first, until one must wait for a retry."""
        with self._upload_lock:
            while True:
                with self._lock:
                    if self._disabled or not self._uploads:
                        return
                    path, step = min(self._uploads.items(), key=lambda item: item[1])
                if not self._upload(path, step, training_waits):
                    return

    def _upload(self, path: str, step: int, training_waits: bool) -> bool:
        """One try; False when it is to be retried later."""
        stored = False
        try:
            if _on_disk(path):  # else pruned: a newer checkpoint replaced it
                # Bytes read while the training loop waits are its progress; a retry in the
                # background is not (training may be hung meanwhile).
                self.client.upload_checkpoint(
                    path, on_chunk=(lambda size: self._progress()) if training_waits else None)
                stored = True
                self._reachable()
        except ClientError as e:
            if e.code in _FATAL | _RETRY:
                self._failed(e)
            else:  # refused (the job is over, a file changed, too large): for good
                self._log(f"checkpoint {path} (step {step}) was not uploaded: {e}")
            if e.code in _RETRY:
                return False
        except (OSError, ValueError) as e:
            if _on_disk(path):  # else pruned meanwhile: nothing to say
                self._log(f"checkpoint {path} (step {step}) was not uploaded: {e}")
        with self._lock:
            self._uploads.pop(path, None)
            if stored:
                self._stored.add(path)
        return True

    # ------------------------------------------------------------ failures

    def _reachable(self) -> None:
        with self._lock:
            if self._unreachable:
                self._unreachable, self._retry_at = False, 0.0
                self._backoff = min(0.5, self.retry_interval)
                self._changed.notify_all()

    def _failed(self, error: ClientError) -> None:
        if error.code in _FATAL:  # this token is dead: nothing more will be accepted
            with self._lock:
                self._disabled = str(error)
                self._pending.clear()
                self._uploads.clear()
                self._held = None
                self._changed.notify_all()
            self._log(f"stopped reporting: {error}")
            return
        with self._lock:
            self._unreachable = True
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, self.retry_interval)
            self._changed.notify_all()  # the upload thread retries what failed, when due
        self._warn_once(error, f"report failed, will retry: {error}")

    def _warn_once(self, error: ClientError, line: str) -> None:
        if error.code not in self._warned:
            self._warned.add(error.code)
            self._log(line)


def create_reporter(address: str, rank: int,
                    environ: Mapping[str, str] | None = None) -> Reporter | None:
    """The coordinator's reporter for one rank (``worker.events.build_reporters`` calls it).

    The coordinator's heartbeat timeout (``DPTRAIN_HEARTBEAT_TIMEOUT``, set by the runner)
    sets how often progress that no event carries is told: a quarter of it, at most 5 s.

    Args:
        address: ``DPTRAIN_COORDINATOR``.
        rank: this process's rank.
        environ: the environment with the job's id, token and TLS CA (default: ``os.environ``).

    Returns:
        A `CoordinatorReporter` on rank 0; None on the other ranks.

    Raises:
        KeyError: ``DPTRAIN_JOB_ID`` or ``DPTRAIN_JOB_TOKEN`` is missing.
        ValueError: ``DPTRAIN_HEARTBEAT_TIMEOUT`` is not a number of seconds > 0.
    """
    if rank != 0:
        return None
    environ = os.environ if environ is None else environ
    env = read_worker_environment({**environ, COORDINATOR: address})
    timeout = env.heartbeat_timeout
    interval = 5.0 if timeout is None else min(5.0, timeout / 4)
    return CoordinatorReporter(WorkerClient(env.address, env.job_id, env.token, env.tls_ca),
                               rank=rank, heartbeat_interval=interval, heartbeat_timeout=timeout,
                               flush_interval=min(0.5, interval))


def fetch_code(sha256: str, target: str | os.PathLike,
               environ: Mapping[str, str] | None = None) -> str:
    """Fetch, verify and unpack the job's code into `target` (`WorkerClient.fetch_code`).

    Raises:
        KeyError: a required variable of `dptrain.worker.environment` is missing.
        ClientError: the transfer failed (the message says why).
        CodeArchiveError: the archive is not a safe code archive.
    """
    with WorkerClient.from_environment(environ) as client:
        return client.fetch_code(sha256, target)


def fetch_resume_checkpoint(dest_dir: str | os.PathLike,
                            environ: Mapping[str, str] | None = None) -> str | None:
    """Put the job's newest intact checkpoint into the worker's checkpoint directory.

    Call it on rank 0 only, before training with ``--resume``; the worker's own resume code
    then loads the newest intact checkpoint in `dest_dir` (this one, unless a newer intact one
    is already there).

    Args:
        dest_dir: the worker's ``--checkpoint-dir``.
        environ: the environment (default: ``os.environ``).

    Returns:
        The checkpoint's directory, or None when the coordinator has none for the job.

    Raises:
        KeyError: a required variable of `dptrain.worker.environment` is missing.
        ClientError: the transfer failed (the message says why).
    """
    with WorkerClient.from_environment(environ) as client:
        return client.fetch_checkpoint(dest_dir)
