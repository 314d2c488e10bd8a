"""The worker's side of the coordinator: progress reports, heartbeats, checkpoint transfers.

``worker.events.build_reporters`` imports this module when ``DPTRAIN_COORDINATOR`` is set and
calls `create_reporter`; rank 0 gets a `CoordinatorReporter` (metrics are global, so one rank
reporting is enough), the other ranks None. ``python -m worker --resume`` calls
`fetch_resume_checkpoint` on rank 0 before training, so the worker's own resume code finds the
job's latest intact checkpoint in its checkpoint directory.

The reporter never stops training: a coordinator that is unreachable is retried (events wait in
a bounded buffer), and one that refuses the job (cancelled, timed out, token replaced by a newer
launch) is told about once on stderr and then left alone.

Reporting policy: per-step metrics are throttled to at most one event every ``step_interval``
seconds (the newest step is never lost: it is sent with the next batch), evaluation metrics,
log lines and the final metrics always go; a background thread sends what is pending every
``flush_interval`` seconds and a heartbeat when nothing was sent for ``heartbeat_interval``
seconds, also while a long step computes. Each checkpoint is uploaded when it is written.

Heartbeats mean "training makes progress", not merely "the process exists": once the training
loop has been silent (no step, evaluation, log line or checkpoint) for ``stall_timeout`` seconds
(``DPTRAIN_STALL_TIMEOUT``, default 300), they pause, so that a rank stuck in a hung collective
stops heartbeating and the coordinator's heartbeat timeout ends the job instead of letting it
hold its slots forever. They resume with the next sign of progress.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from coordinator import serde
from coordinator.checkpoints import MANIFEST, CheckpointUpload, read_checkpoint_directory
from coordinator.client import Client, ClientError
from coordinator.errors import ValidationError
from coordinator.hashed_io import write_hashed
from coordinator.limits import MAX_EVENTS_PER_REPORT
from coordinator.model import CheckpointRecord, EventKind, JobState
from coordinator.worker_env import (
    COORDINATOR,
    DEFAULT_STALL_TIMEOUT,
    STALL_TIMEOUT,
    read_worker_environment,
)
from protos.dptrain.v1 import coordinator_pb2 as pb
from worker.events import Reporter

__all__ = ["WorkerClient", "CoordinatorReporter", "create_reporter", "fetch_resume_checkpoint"]

_FATAL = frozenset({"FAILED_PRECONDITION", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND"})
_RETRY = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


def _stderr(line: str) -> None:
    print(f"dptrain worker: coordinator: {line}", file=sys.stderr, flush=True)


class WorkerClient(Client):
    """A `Client` holding a job's worker token, with the ``WorkerService`` calls.

    Args:
        address: the coordinator's ``host:port``.
        job_id: the job.
        token: its worker token.
        tls_ca: the CA certificate path (None: plaintext).
        timeout: seconds each unary call may take.
    """

    def __init__(self, address: str, job_id: str, token: str,
                 tls_ca: str | os.PathLike | None = None, timeout: float = 10.0):
        super().__init__(address, token=token, tls_ca=tls_ca, timeout=timeout, job_id=job_id)
        self.job_id = job_id

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> WorkerClient:
        """A client configured by the variables of `coordinator.worker_env`.

        Raises:
            KeyError: a required variable is missing.
        """
        env = read_worker_environment(environ)
        return cls(env.address, env.job_id, env.token, env.tls_ca)

    def report_progress(self, items: Iterable[tuple[EventKind | str, Mapping[str, Any]]]) -> int:
        """Send a batch of ``(kind, payload)`` events (``metrics`` or ``log``).

        Returns:
            The sequence number of the last event stored.
        """
        request = pb.ReportProgressRequest(
            job_id=self.job_id, events=[serde.worker_event_to_proto(k, p) for k, p in items])
        return self._unary(self._worker_stub.ReportProgress, request).last_seq

    def heartbeat(self) -> JobState:
        """Tell the coordinator the job is alive; returns its state."""
        response = self._unary(self._worker_stub.Heartbeat,
                               pb.HeartbeatRequest(job_id=self.job_id))
        return serde.state_from_proto(response.state)

    def upload_checkpoint(self, path: str | os.PathLike, timeout: float | None = 3600.0,
                          on_chunk: Callable[[int], None] | None = None) -> CheckpointRecord:
        """Upload a checkpoint directory written by ``worker.checkpoint.write_checkpoint``.

        Args:
            path: the directory (``step-XXXXXXXX``).
            timeout: seconds the whole upload may take.
            on_chunk: called with each chunk's size as it is read.

        Returns:
            The record the coordinator stored.

        Raises:
            ClientError: DATA_LOSS (a file changed since its manifest was written),
                RESOURCE_EXHAUSTED (too large), FAILED_PRECONDITION (the job is over), ...
            OSError, ValueError: the manifest cannot be read.
        """
        header, chunks = read_checkpoint_directory(self.job_id, path, on_chunk)

        def requests() -> Iterator[pb.UploadCheckpointRequest]:
            yield pb.UploadCheckpointRequest(header=serde.upload_header_to_proto(header))
            for name, data in chunks:
                yield pb.UploadCheckpointRequest(chunk=pb.FileChunk(name=name, data=data))

        response = self._unary(self._worker_stub.UploadCheckpoint, requests(), timeout)
        return serde.checkpoint_from_proto(response)

    def fetch_checkpoint(self, dest_dir: str | os.PathLike) -> str | None:
        """Download the job's newest intact checkpoint as ``dest_dir/step-XXXXXXXX``.

        Files are written into a temporary directory, checked against their sha256s and by
        ``worker.checkpoint.verify_checkpoint``, and renamed into place (replacing a damaged
        copy of the same step). An identical intact copy already there is kept as it is.

        Args:
            dest_dir: the worker's checkpoint directory (created if missing).

        Returns:
            The checkpoint's directory, or None when the job has no intact checkpoint.

        Raises:
            ClientError: the transfer failed, or DATA_LOSS when a file fails its sha256.
        """
        from worker.checkpoint import CheckpointError, checkpoint_name, verify_checkpoint

        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        stream = self._stream(self._worker_stub.FetchCheckpoint,
                              pb.FetchCheckpointRequest(job_id=self.job_id), timeout=3600.0)
        try:
            try:
                first = next(stream, None)
            except ClientError as e:
                if e.code == "NOT_FOUND":
                    return None
                raise
            if first is None or first.WhichOneof("item") != "header":
                raise ClientError("INTERNAL", "the fetch stream did not start with a header")
            header = serde.upload_header_from_proto(first.header)
            final = dest / checkpoint_name(header.step)
            try:
                if (final / MANIFEST).read_bytes() == header.manifest_json:
                    verify_checkpoint(final)
                    return str(final)
            except (OSError, CheckpointError):
                pass  # absent or damaged here: download it
            tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".fetch-"))
            try:
                _write_files(header, serde.chunks_from_upload(stream), tmp)
                (tmp / MANIFEST).write_bytes(header.manifest_json)
                verify_checkpoint(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except ValidationError as e:
                raise ClientError("INTERNAL", f"bad fetch stream: {e}") from None
            except CheckpointError as e:
                raise ClientError("DATA_LOSS", f"the fetched checkpoint is unusable: {e}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return str(final)
        finally:
            stream.close()


def _write_files(header: CheckpointUpload, chunks: Iterable[tuple[str, bytes]],
                 directory: Path) -> None:
    """Write the fetched files into `directory`, checking each against the header."""
    expected = {f.name: f for f in header.files}
    for name in expected:
        if name in ("", ".", "..", MANIFEST) or Path(name).name != name:
            raise ClientError("INTERNAL", f"the fetch stream names a bad file {name!r}")
    written: dict[str, tuple[str, int]] = {}
    for name, group in itertools.groupby(chunks, key=lambda chunk: chunk[0]):
        if name not in expected or name in written:
            raise ClientError("INTERNAL", f"unexpected chunk of {name!r} in the stream")
        with open(directory / name, "wb") as f:
            written[name] = write_hashed((data for _, data in group), f)
    for name, entry in expected.items():
        if name not in written and entry.size == 0:  # an empty file has no chunks
            (directory / name).write_bytes(b"")
            written[name] = (hashlib.sha256().hexdigest(), 0)
        got = written.get(name)
        if got != (entry.sha256, entry.size):
            raise ClientError("DATA_LOSS", f"{name}: received {got[1] if got else 0} bytes "
                              f"hashing to {got[0] if got else 'nothing'}, expected "
                              f"{entry.size} bytes with sha256 {entry.sha256}")


class CoordinatorReporter(Reporter):
    """Reports rank 0's progress to the coordinator (see the module docstring for the policy).

    Args:
        client: the job's `WorkerClient` (closed by `close`).
        rank: the rank reporting (recorded with log lines).
        step_interval: at most one per-step metrics event per this many seconds.
        flush_interval: seconds between sends of pending events.
        heartbeat_interval: send a heartbeat after this many seconds without contact.
        stall_timeout: stop heartbeating after this many seconds without training progress.
        max_pending: events kept while the coordinator is unreachable (oldest dropped).
        log: where the reporter's own troubles are written (default: stderr).
    """

    def __init__(self, client: WorkerClient, *, rank: int = 0, step_interval: float = 0.1,
                 flush_interval: float = 0.5, heartbeat_interval: float = 5.0,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, max_pending: int = 10_000,
                 log: Callable[[str], None] = _stderr):
        self.client = client
        self.rank = rank
        self.step_interval, self.flush_interval = step_interval, flush_interval
        self.heartbeat_interval, self.stall_timeout = heartbeat_interval, stall_timeout
        self._last_activity = time.monotonic()
        self._stalled = False
        self._log = log
        self._lock = threading.Lock()       # guards the fields below
        self._send_lock = threading.Lock()  # one report at a time, in order
        self._pending: collections.deque = collections.deque(maxlen=max_pending)
        self._held: dict[str, Any] | None = None  # the newest step's metrics, not yet queued
        self._last_step_queued = -float("inf")
        self._last_contact = time.monotonic()
        self._disabled: str | None = None
        self._unreachable = False  # the last call failed with a retryable error
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dptrain-reporter", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ Reporter events

    def on_start(self, info: dict[str, Any]) -> None:
        self._active()
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
        now = time.monotonic()
        self._last_activity = now
        with self._lock:
            if self._disabled:
                return
            if now - self._last_step_queued >= self.step_interval:
                self._pending.append((EventKind.METRICS, payload))
                self._last_step_queued, self._held = now, None
            else:
                self._held = payload

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self._active()
        self._queue(EventKind.METRICS, {"step": step, **metrics})

    def on_log(self, line: str) -> None:
        # Progress, not content: the runner already streams every rank's output (tracebacks
        # included) from the job's log file as log events, so forwarding would duplicate it.
        self._active()

    def on_checkpoint(self, step: int, path: str) -> None:
        self._active()
        self.flush()
        if self._disabled:
            return
        for attempt in range(3):
            try:
                self.client.upload_checkpoint(path)
                self._touch()
                return
            except ClientError as e:
                if e.code in _RETRY and attempt < 2:
                    time.sleep(1.0 + attempt)
                    continue
                self._log(f"checkpoint {path} (step {step}) was not uploaded: {e}")
                self._handle(e)
                return
            except OSError as e:  # e.g. pruned locally before it could be read
                self._log(f"checkpoint {path} (step {step}) was not uploaded: {e}")
                return

    def on_end(self, metrics: dict[str, Any]) -> None:
        self._active()
        self._queue(EventKind.METRICS, {**metrics, "step": int(metrics.get("step") or 0)})
        self.flush()

    def close(self) -> None:
        """Stop the background thread, send what is pending, close the connection."""
        self._stop.set()
        self._thread.join(timeout=30)
        if not self._unreachable:  # don't make a finished worker wait on a dead coordinator
            self.flush()
        self.client.close()

    # ------------------------------------------------------------ sending

    def _queue(self, kind: EventKind, payload: dict[str, Any]) -> None:
        with self._lock:
            if self._disabled:
                return
            if self._held is not None:
                self._pending.append((EventKind.METRICS, self._held))
                self._held = None
            self._pending.append((kind, payload))

    def _active(self) -> None:
        self._last_activity = time.monotonic()

    def _touch(self) -> None:
        with self._lock:
            self._last_contact = time.monotonic()
            self._unreachable = False

    def flush(self) -> bool:
        """Send every pending event now (in batches).

        Returns:
            True when nothing is left pending.
        """
        with self._send_lock:
            while not self._disabled:
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
                except ClientError as e:
                    if e.code == "INVALID_ARGUMENT":  # a bad batch: drop it, keep going
                        self._log(f"progress report refused, {len(batch)} event(s) "
                                  f"dropped: {e}")
                    else:
                        self._handle(e)
                        return False
                with self._lock:
                    for _ in range(min(len(batch), len(self._pending))):
                        self._pending.popleft()
                    self._last_contact = time.monotonic()
                    self._unreachable = False
            return False

    def _handle(self, error: ClientError) -> None:
        if error.code in _FATAL:
            with self._lock:
                self._disabled = str(error)
                self._pending.clear()
                self._held = None
            self._log(f"stopped reporting: {error}")
        else:
            self._unreachable = True
            if error.code not in self._warned:
                self._warned.add(error.code)
                self._log(f"report failed, will retry: {error}")

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval) and not self._disabled:
            with self._lock:
                busy = bool(self._pending) or self._held is not None
                idle_for = time.monotonic() - self._last_contact
            silent_for = time.monotonic() - self._last_activity
            if silent_for >= self.stall_timeout:
                if not self._stalled:
                    self._log(f"no training progress for {silent_for:.0f} s: heartbeats "
                              f"paused (a hung rank or collective?)")
                self._stalled = True
                continue
            self._stalled = False
            if busy:
                self.flush()
            elif idle_for >= self.heartbeat_interval:
                try:
                    self.client.heartbeat()
                    self._touch()
                except ClientError as e:
                    self._handle(e)


def create_reporter(address: str, rank: int,
                    environ: Mapping[str, str] | None = None) -> Reporter | None:
    """The coordinator's reporter for one rank (``worker.events.build_reporters`` calls it).

    Args:
        address: ``DPTRAIN_COORDINATOR``.
        rank: this process's rank.
        environ: the environment with the job's id, token and TLS CA (default: ``os.environ``).

    Returns:
        A `CoordinatorReporter` on rank 0; None on the other ranks.

    Raises:
        KeyError: ``DPTRAIN_JOB_ID`` or ``DPTRAIN_JOB_TOKEN`` is missing.
    """
    if rank != 0:
        return None
    environ = os.environ if environ is None else environ
    env = read_worker_environment({**environ, COORDINATOR: address})
    try:
        stall = float(environ.get(STALL_TIMEOUT) or DEFAULT_STALL_TIMEOUT)
    except ValueError:
        raise ValueError(f"{STALL_TIMEOUT} must be a number of seconds, got "
                         f"{environ.get(STALL_TIMEOUT)!r}") from None
    return CoordinatorReporter(WorkerClient(env.address, env.job_id, env.token, env.tls_ca),
                               rank=rank, stall_timeout=stall)


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
        KeyError: a required variable of `coordinator.worker_env` is missing.
        ClientError: the transfer failed (the message says why).
    """
    with WorkerClient.from_environment(environ) as client:
        return client.fetch_checkpoint(dest_dir)
