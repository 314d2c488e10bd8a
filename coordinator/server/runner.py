"""`JobRunner`: runs the scheduler's decisions as worker groups and supervises them.

One scheduling thread does the deciding: woken by `JobRunner.wake` (after a submission), by a
job's end and by timers, it kills groups past their grace period, stops runs past their job's
``time_limit`` (seconds from the run's ``started_at``, the clock the scheduler's reservations
use; each run, a restart's too, gets the whole limit, as in Slurm), ends jobs whose training made
no progress for the heartbeat timeout (counted from when the launcher's handle says the ranks
run, `RunHandle.started`: an attempt waiting in a batch queue is not hung), and asks
`server.scheduler.schedule` which pending jobs (QUEUED and RESTARTING) start now. The settings'
`Launcher` starts each attempt (``mpiexec`` by default; `server.server.launchers`) and returns
a handle the runner polls and stops; nothing here knows how ranks are started or found. Each
launched attempt gets a monitor thread that streams its log lines into the store as ``log``
events (at a bounded rate) and, when the attempt exits, decides what happens to the job:

=====================================  ===========================================================
exit 0                                 SUCCEEDED (final metrics from the worker's JSON line),
                                       once the coordinator holds the final checkpoint, verified;
                                       otherwise a failure (below)
exit 2 (invalid job), 3 (diverged),    FAILED at once: a restart would fail the same way
4 (no space for a checkpoint)
any other failure, a killed rank, no   RESTARTING from the latest checkpoint (``--resume``) while
training progress (no heartbeat) for   ``restarts < max_restarts``, then FAILED; the error keeps
``heartbeat_timeout``                  the last lines of the log
past the time limit                    the group is terminated (SIGTERM: the workers finish
                                       their step, write and upload a checkpoint and exit), killed
                                       after ``kill_grace``; TIMED_OUT once that final checkpoint
                                       is stored and verified (never restarted)
cancelled (CANCELLING)                 the same stop; CANCELLED once the group is gone and its
                                       final checkpoint stored
=====================================  ===========================================================

Every state change is a compare-and-set on the store, so a cancel racing a launch or an exit
has exactly one winner. A cancelled group keeps its slots, for scheduling, until it is gone.

No checkpoint is lost. The workers upload each checkpoint as they write it, but they cannot
while the coordinator is down, and a token whose attempt is over may no longer. So the runner
itself stores what the job's checkpoint directory holds beyond the newest stored checkpoint
(`server.ingest`): when an attempt ends and before every relaunch. A
job is SUCCEEDED only when the store holds its final checkpoint (the step of the worker's
final JSON line) and its blobs verify; when it cannot be stored, the attempt counts as failed
and the job restarts (resuming at that final step) or fails.

Coordinator restarts. `JobRunner.stop` (a graceful shutdown) *terminates* the running groups:
SIGTERM makes every worker finish its step, write a checkpoint and exit; the jobs go back to
RESTARTING (not counted as a restart) and the next `JobRunner.start` on the same state
directory relaunches them with ``--resume``, losing nothing but start-up time. We chose this
over leaving groups running because a restarted coordinator is not the parent of an older
group: it could not learn its exit status, and the group's reports would go to a coordinator
that is down. After a kill -9 the groups may still be running: `start` asks the launcher for
what is left of each RUNNING or CANCELLING job's attempt (`Launcher.recover`, from
``run.json``), terminates it the same way, and relaunches the job from its latest checkpoint;
a CANCELLING job, or a RUNNING one past its time limit, ends instead (CANCELLED, TIMED_OUT)
with what its workers wrote stored. QUEUED jobs stay queued.
A lock file (``runner.lock``) keeps two coordinators off one state directory.

Example::

    runner = JobRunner(store, blobs, Cluster.local(2), None, RunnerSettings("state"))
    runner.start()
    store.create_job(new_job("digits", spec)); runner.wake()
    ...
    runner.stop()
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from dptrain.coordinator.api.errors import (
    JobNotFound,
    StateConflict,
    StoreClosed,
)
from dptrain.coordinator.api.records import (
    HOLDING_STATES,
    PENDING_STATES,
    EventKind,
    Job,
    JobState,
    hash_token,
    new_token,
)
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.ingest import DirectoryCheckpoints
from dptrain.coordinator.server.job_files import lock_state_dir, read_run_record
from dptrain.coordinator.server.joblog import LineRateLimit, LogTail, failure_message
from dptrain.coordinator.server.jobs import data_files
from dptrain.coordinator.server.launchers.base import (
    LaunchError,
    RunHandle,
    SharedPath,
    WorkerLaunch,
    attempt_environment,
    new_run_id,
    placement_text,
)
from dptrain.coordinator.server.private_files import make_private_dir, open_private, write_private
from dptrain.coordinator.server.runner_settings import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster, Launch, PendingJob, RunningJob, schedule
from dptrain.coordinator.server.store import Store
from dptrain.worker.exit_codes import EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_INVALID

__all__ = ["JobRunner", "RunnerSettings", "NO_RESTART_EXIT_CODES"]

log = logging.getLogger("dptrain.coordinator.runner")

#: Worker exit codes that end a job at once: an invalid job or a diverged loss would only
#: fail again from the same checkpoint.
NO_RESTART_EXIT_CODES = frozenset({EXIT_INVALID, EXIT_DIVERGED, EXIT_DISK_FULL})
_EVENT_BATCH = 200
_S = JobState


@dataclass(eq=False)
class _Attempt:
    """One attempt of one job: its launcher's handle and what the runner knows of it."""

    job_id: str
    attempt: int
    run_id: str
    handle: RunHandle
    placement: tuple[tuple[str, int], ...]
    started_at: float
    tail: LogTail
    limit: LineRateLimit
    reason: str | None = None      # why it was ended: cancel, time limit, heartbeat, shutdown
    detail: str = ""               # e.g. how long the heartbeat was missing
    kill_at: float | None = None   # monotonic time at which terminate becomes kill
    done: bool = False
    running_since: float | None = None  # wall clock at which the ranks were seen running
    thread: threading.Thread | None = None


class JobRunner:
    """Launches scheduled jobs through the settings' launcher and keeps their states true.

    Args:
        store: the coordinator's store.
        blobs: its checkpoint blobs (the workers upload; the runner stores what they could
            not from the job's checkpoint directory).
        cluster: the hosts and slots to schedule on.
        server_address: the address workers report to (``DPTRAIN_COORDINATOR``); None: the
            workers only print to their log (tests without a server).
        settings: its settings, the launcher among them.
    """

    def __init__(self, store: Store, blobs: BlobStore, cluster: Cluster,
                 server_address: str | None, settings: RunnerSettings):
        self.store, self.blobs, self.cluster = store, blobs, cluster
        self.server_address = server_address
        self.settings = settings
        self.launcher = settings.launcher
        self.checkpoints = DirectoryCheckpoints(
            store, blobs, lambda job_id: settings.job_paths(job_id).checkpoints, self._event)
        self._lock = threading.RLock()
        self._runs: dict[str, _Attempt] = {}
        self._draining: list[_Attempt] = []  # ended by the runner, not yet exited
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file: IO[str] | None = None

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Lock the state directory, recover jobs a previous coordinator left running, and
        start the scheduling thread.

        Raises:
            RuntimeError: another coordinator holds this state directory.
        """
        make_private_dir(self.settings.jobs_dir)
        self._lock_file = lock_state_dir(self.settings.state_dir)
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="dptrain-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop scheduling and terminate every running group (SIGTERM: the workers
        checkpoint; SIGKILL after the grace period). Their jobs become RESTARTING, without
        counting a restart, so the next `start` resumes them. Idempotent.

        Args:
            timeout: seconds to wait for the groups (default ``kill_grace`` + 5).
        """
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            runs = list(self._runs.values()) + list(self._draining)
            for run in runs:
                self._terminate(run, "shutdown")
        deadline = time.monotonic() + (self.settings.kill_grace + 5 if timeout is None
                                       else timeout)
        for run in runs:
            while run.thread is not None and run.thread.is_alive():
                if run.kill_at is not None and time.monotonic() >= run.kill_at:
                    self._kill(run)
                if time.monotonic() > deadline:
                    self._kill(run)
                run.thread.join(0.1)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def wake(self) -> None:
        """Run the scheduler soon (call it after a job was submitted)."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """End a cancelled job's group, if it has one: terminate it (the workers checkpoint
        and exit), kill it after ``kill_grace``. The caller has moved the job to CANCELLING
        (or, when pending, CANCELLED) in the store already (`server.jobs.cancel_job`); a
        CANCELLING job keeps its slots until the group is gone, then its final checkpoint is
        stored and it becomes CANCELLED.

        Args:
            job_id: the job.
        """
        with self._lock:
            run = self._runs.get(job_id)
            if run is not None:
                self._terminate(run, "cancel")
        self.wake()

    def running(self) -> dict[str, str]:
        """The jobs whose groups this runner is supervising: job id -> the launcher's
        description of the attempt (e.g. ``mpiexec pid 123``)."""
        with self._lock:
            return {job_id: run.handle.description for job_id, run in self._runs.items()}

    # ------------------------------------------------------------ the scheduling thread

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                timeout = self._tick()
            except StoreClosed:
                return
            except Exception:  # keep scheduling: one bad job must not stop the coordinator
                log.exception("runner: scheduling pass failed")
                timeout = 1.0
            self._wake.wait(timeout)

    def _tick(self) -> float:
        """One pass: escalate kills, check heartbeats, launch. Returns seconds to sleep."""
        now, timeout = time.time(), 2.0
        with self._lock:
            runs = list(self._runs.values()) + list(self._draining)
        for run in runs:
            if run.kill_at is not None:
                left = run.kill_at - time.monotonic()
                if left <= 0:
                    self._kill(run)
                else:
                    timeout = min(timeout, left)
        holding_jobs = self.store.all_jobs(HOLDING_STATES)
        running_jobs = [job for job in holding_jobs if job.state is _S.RUNNING]
        timeout = min(timeout, self._check_heartbeats(running_jobs, now),
                      self._check_time_limits(running_jobs, now))
        supervised = {run.job_id for run in runs}
        for job in holding_jobs:
            if job.state is _S.CANCELLING and job.id not in supervised:
                self._finish_cancel(job.id)  # its group ended before the cancel reached it
        pending = self.store.all_jobs(PENDING_STATES)
        if not pending:
            return timeout
        holding = [RunningJob.from_job(job) for job in holding_jobs]
        held = {job.id for job in holding_jobs}
        holding += [RunningJob(f"{run.job_id}#ending", run.placement, run.started_at)
                    for run in runs if run.job_id not in held and not run.done]
        decision = schedule([PendingJob.from_job(j) for j in pending], holding, self.cluster,
                            now, self.settings.kill_grace)
        for launch in decision.launches:
            if self._stopping.is_set():
                break
            self._launch(launch)
        for job_id in decision.unschedulable:
            self._fail_pending(job_id, f"workers: the job needs more ranks than the cluster's "
                                       f"{self.cluster.capacity} slots")
        return timeout

    def _check_heartbeats(self, running_jobs: Sequence[Job], now: float) -> float:
        """End the groups of jobs whose training made no progress for the heartbeat timeout
        (the workers heartbeat only while steps advance); seconds until the next deadline."""
        limit = self.settings.heartbeat_timeout
        if limit is None:
            return 2.0
        nearest = 2.0
        for job in running_jobs:
            with self._lock:
                run = self._runs.get(job.id)
            if run is None or run.reason is not None or run.running_since is None:
                continue  # not started yet (e.g. queued by Slurm): no heartbeat to miss
            started = max(job.started_at or run.started_at, run.running_since)
            last = max(job.heartbeat_at or started, started)
            quiet_for = max(limit, self.settings.startup_grace) if last <= started else limit
            deadline = last + quiet_for
            if now >= deadline:
                since = (f"since step {job.last_step} (limit {quiet_for:g} s)"
                         if last > started and job.last_step is not None else
                         f"since the attempt started (limit {quiet_for:g} s, start-up included)")
                with self._lock:
                    run.detail = (f"no training progress for {now - last:.1f} s {since}: a "
                                  f"hung rank or collective?")
                    self._terminate(run, "heartbeat")
                self._event(job.id, f"[dptrain] {run.detail}; ending the worker group")
            else:
                nearest = min(nearest, deadline - now)
        return max(nearest, 0.05)

    def _check_time_limits(self, running_jobs: Sequence[Job], now: float) -> float:
        """Stop the runs past their job's time limit (counted from the run's ``started_at``,
        as the scheduler's reservations count it); seconds until the next limit."""
        nearest = 2.0
        for job in running_jobs:
            if job.time_limit is None or job.started_at is None:
                continue
            with self._lock:
                run = self._runs.get(job.id)
            if run is None or run.reason is not None:
                continue
            end = job.started_at + job.time_limit
            if now < end:
                nearest = min(nearest, end - now)
                continue
            with self._lock:
                self._terminate(run, "time limit")
            self._event(job.id, f"[dptrain] time limit of {job.time_limit:g} s reached after "
                                f"{now - job.started_at:.1f} s: stopping the workers (they "
                                f"finish their step and checkpoint; killed after "
                                f"{self.settings.kill_grace:g} s)")
        return max(nearest, 0.05)

    # ------------------------------------------------------------ launching

    def _launch(self, launch: Launch) -> None:
        # Before the lock (it may take a while): what an earlier attempt wrote, for the
        # workers to resume from. Nothing is there for a job's first attempt.
        self.checkpoints.store_new(launch.job_id)
        if not self._preflight(launch):
            return
        with self._lock:
            try:
                job = self.store.get_job(launch.job_id)
            except JobNotFound:
                return
            if job.state not in PENDING_STATES or job.id in self._runs:
                return
            paths = self.settings.job_paths(job.id)
            make_private_dir(paths.checkpoints)
            previous = read_run_record(paths.run)
            attempt = int(previous.get("attempt", 0)) + 1 if previous else 1
            write_private(paths.spec, json.dumps(job.spec, indent=1, sort_keys=True) + "\n")
            token, run_id = new_token(), new_run_id(job.id, attempt)
            env = attempt_environment(os.environ, job_id=job.id, token=token, run_id=run_id,
                                      server_address=self.server_address,
                                      tls_ca=self.settings.tls_ca,
                                      heartbeat_timeout=self.settings.heartbeat_timeout,
                                      extra=self.settings.extra_env)
            try:
                job = self.store.transition(job.id, job.state, _S.RUNNING,
                                            placement=launch.placement, error="",
                                            token_hash=hash_token(token), exit_code=None)
            except StateConflict:  # cancelled meanwhile
                return
            where = placement_text(launch.placement)
            resuming = ", resuming from the latest checkpoint" if attempt > 1 else ""
            header = (f"==== dptrain: attempt {attempt} of job {job.id} ({job.name}) at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}: {launch.workers} rank(s) on "
                      f"{where}{resuming}\n")
            stop_by = (None if job.time_limit is None
                       else job.time_limit + self.settings.kill_grace)
            request = WorkerLaunch(job.id, attempt, run_id, launch.placement, paths, env,
                                   resume=attempt > 1, started_at=job.started_at,
                                   stop_by=stop_by)
            with os.fdopen(open_private(paths.log, os.O_WRONLY | os.O_APPEND), "ab") as log_file:
                log_file.write(header.encode())
                log_file.flush()  # before the workers write after it
                offset = log_file.tell()
                try:
                    handle = self.launcher.start(request, log_file)
                except LaunchError as e:
                    self._transition(job.id, _S.FAILED, error=f"cannot start the workers: {e}")
                    return
            run = _Attempt(job.id, attempt, run_id, handle, launch.placement,
                       job.started_at or time.time(),
                       LogTail(paths.log, offset, keep=self.settings.error_lines),
                       LineRateLimit(self.settings.log_rate, self.settings.log_burst))
            run.thread = threading.Thread(target=self._monitor, args=(run,), daemon=True,
                                          name=f"dptrain-run-{job.id}")
            self._runs[job.id] = run
            log.info("job %s: attempt %d launched on %s (%s)", job.id, attempt, where,
                     handle.description)
            if handle.started():
                run.running_since = time.time()
            else:
                self._event(job.id, f"[dptrain] waiting for {handle.description} to start "
                                    f"the ranks (the heartbeat timeout counts once they run)")
            run.thread.start()

    def _preflight(self, launch: Launch) -> bool:
        """The launcher's check of the placement's hosts (outside the lock: it reaches other
        hosts). A failure fails the job at once, its restarts untouched: another attempt on
        the same hosts would fail the same way. Returns whether to launch."""
        paths = self.settings.job_paths(launch.job_id)
        make_private_dir(paths.checkpoints)  # the job's directory, which the hosts must see
        try:
            spec = self.store.get_job(launch.job_id).spec
        except JobNotFound:
            return False
        dataset = spec.get("dataset") or {}
        shared = [SharedPath(item, f"{field}: the job's data files must be at the same path on "
                                   f"every host")
                  for field, item in data_files(dataset.get("name", ""), dataset.get("args") or {})
                  if isinstance(item, str)]
        if self.settings.tls_ca is not None:
            shared.append(SharedPath(os.fspath(self.settings.tls_ca), "DPTRAIN_TLS_CA: the CA "
                                     "certificate the workers verify the coordinator with must "
                                     "be at the same path on every host"))
        try:
            self.launcher.preflight(launch.placement, paths, shared)
        except LaunchError as e:
            self._event(launch.job_id, f"[dptrain] {e}")
            self._fail_pending(launch.job_id, str(e))
            log.info("job %s: FAILED: %s", launch.job_id, e)
            return False
        return True

    def _fail_pending(self, job_id: str, error: str) -> None:
        try:
            job = self.store.get_job(job_id)
            if job.state in PENDING_STATES:  # not cancelled meanwhile
                self.store.transition(job_id, job.state, _S.FAILED, error=error)
        except (StateConflict, JobNotFound):
            pass

    # ------------------------------------------------------------ supervising a run

    def _monitor(self, run: _Attempt) -> None:
        """Stream the run's log lines until the attempt exits, then settle the job."""
        code = None
        while code is None:
            code = run.handle.poll()
            if code is None:
                self._note_started(run)
                self._publish(run, run.tail.read())
                time.sleep(self.settings.poll_interval)
        self._note_started(run)  # ranks that started and ended between two polls
        with self._lock:
            run.done = True
        run.handle.reap()  # the last lines, final metrics among them, are written after this
        self._publish(run, run.tail.read(final=True), final=True)
        try:
            self._settle(run, code)
        except (StoreClosed, JobNotFound):  # shutting down, or a cancelled job deleted since
            pass
        except Exception:
            log.exception("runner: settling job %s failed", run.job_id)
        finally:
            with self._lock:
                if self._runs.get(run.job_id) is run:
                    del self._runs[run.job_id]
                if run in self._draining:
                    self._draining.remove(run)
            self.wake()

    def _note_started(self, run: _Attempt) -> None:
        """Start the run's heartbeat clock once its handle says the ranks run."""
        if run.running_since is not None or not run.handle.started():
            return
        now = time.time()
        with self._lock:
            run.running_since = now
        self._event(run.job_id, f"[dptrain] the ranks started after {now - run.started_at:.0f} "
                                f"s waiting ({run.handle.description})")

    def _publish(self, run: _Attempt, lines: list[str], final: bool = False) -> None:
        """Append a run's new log lines as events, within its rate limit; once a burst is
        over (or the run ended), say how many lines were left out."""
        allowed = run.limit.admit(len(lines))
        items: list[tuple[EventKind, dict]] = [(EventKind.LOG, {"line": line})
                                               for line in lines[:allowed]]
        dropped = run.limit.take_dropped() if allowed == len(lines) or final else 0
        if dropped:
            items.append((EventKind.LOG, {"line": f"[dptrain] {dropped} log line(s) not "
                                                  f"streamed (rate limit); see worker.log"}))
        for i in range(0, len(items), _EVENT_BATCH):
            try:
                self.store.append_events(run.job_id, items[i:i + _EVENT_BATCH])
            except (JobNotFound, StoreClosed):
                return

    def _settle(self, run: _Attempt, code: int) -> None:
        """Decide the job's next state from how its group ended."""
        job = self.store.get_job(run.job_id)
        final = run.tail.final_metrics or {}
        if job.state is _S.CANCELLING:
            self._finish_cancel(job.id, code, final)
            return
        if job.state is not _S.RUNNING:  # settled by someone else already
            return
        self.checkpoints.store_new(job.id)
        if code == 0:
            missing = self.checkpoints.final_missing(job.id, final)
            if missing is None:
                metrics = {**job.metrics, **{k: v for k, v in final.items() if isinstance(
                    v, (int, float)) and not isinstance(v, bool)}}
                self._transition(job.id, _S.SUCCEEDED, exit_code=0, metrics=metrics,
                                 last_step=final["step"])
                return
            run.detail = f"the workers exited with code 0, but {missing}"
        if run.reason == "shutdown":
            self._transition(job.id, _S.RESTARTING, restarts=job.restarts, exit_code=code)
            self._event(job.id, "[dptrain] the coordinator is shutting down: the job resumes "
                                "from its latest checkpoint when it starts again")
        elif run.reason == "time limit":
            self._transition(job.id, _S.TIMED_OUT, exit_code=code, error=_timed_out(
                job, self.checkpoints.store_stopped(job.id, final)))
        else:
            final_failure = run.reason is None and code in NO_RESTART_EXIT_CODES
            if not final_failure and job.restarts < job.max_restarts:
                self._transition(job.id, _S.RESTARTING, error=self._error(run, code),
                                 exit_code=code)
            else:
                note = "" if final_failure else f" (gave up after {job.restarts} restart(s))"
                self._transition(job.id, _S.FAILED, error=self._error(run, code, note),
                                 exit_code=code)

    def _finish_cancel(self, job_id: str, code: int | None = None,
                       final: dict[str, Any] | None = None) -> None:
        """A CANCELLING job whose group is gone: store what its workers wrote, then CANCELLED."""
        self.checkpoints.store_new(job_id)
        note = self.checkpoints.store_stopped(job_id, final or {})
        try:
            self.store.transition(job_id, _S.CANCELLING, _S.CANCELLED, exit_code=code,
                                  error=f"cancelled by a user; {note}")
        except (StateConflict, JobNotFound):
            return
        log.info("job %s: CANCELLED (%s)", job_id, note)

    def _error(self, run: _Attempt, code: int, note: str = "") -> str:
        return failure_message(list(run.tail.recent), code, run.detail, note)

    def _transition(self, job_id: str, target: JobState, **fields: Any) -> Job | None:
        try:
            job = self.store.transition(job_id, _S.RUNNING, target, **fields)
        except StateConflict:  # cancelled meanwhile
            return None
        log.info("job %s: %s (exit code %s)%s", job_id, target.value, job.exit_code,
                 f": {job.error.splitlines()[0]}" if job.error else "")
        return job

    def _event(self, job_id: str, line: str) -> None:
        try:
            self.store.append_event(job_id, EventKind.LOG, {"line": line})
        except (JobNotFound, StoreClosed):
            pass

    # ------------------------------------------------------------ ending groups

    def _terminate(self, run: _Attempt, reason: str) -> None:
        """Terminate the group (workers checkpoint and exit); a kill follows after the grace
        period. Call with the lock held."""
        if run.done:
            return
        if run.reason is None or reason == "cancel":
            run.reason = reason
        if run.kill_at is None:
            run.kill_at = time.monotonic() + self.settings.kill_grace
            run.handle.terminate()
            if reason == "cancel" and run in self._runs.values():
                self._draining.append(run)
                del self._runs[run.job_id]
        self._wake.set()

    def _kill(self, run: _Attempt) -> None:
        with self._lock:
            if not run.done:
                run.handle.kill()
            run.kill_at = None

    # ------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """After a restart: end the groups a previous coordinator left behind and put their
        jobs back in the queue (RESTARTING, not counted as a restart); a CANCELLING job, or a
        RUNNING one past its time limit, ends instead, once what its workers wrote is stored."""
        orphans: list[RunHandle] = []
        ending: list[Job] = []
        now = time.time()
        for job in self.store.all_jobs(HOLDING_STATES):
            orphan = self.launcher.recover(self.settings.job_paths(job.id))
            alive = orphan is not None
            if orphan is not None:
                orphan.terminate()
                orphans.append(orphan)
            found = "still running: ended them" if alive else "gone"
            if job.state is _S.CANCELLING or _past_time_limit(job, now):
                ending.append(job)
                log.info("job %s: recovered while stopping (workers %s)", job.id, found)
                self._event(job.id, f"[dptrain] the coordinator restarted and found this "
                                    f"job's workers {found}; ending the job (cancelled, or "
                                    f"past its time limit)")
                continue
            try:
                self.store.transition(job.id, _S.RUNNING, _S.RESTARTING, restarts=job.restarts,
                                      error="")
            except StateConflict:
                continue
            log.info("job %s: recovered after a coordinator restart (workers %s)", job.id, found)
            self._event(job.id, f"[dptrain] the coordinator restarted and found this job's "
                                f"workers {found}; resuming from the latest checkpoint")
        deadline = time.monotonic() + self.settings.kill_grace
        while orphans and time.monotonic() < deadline:
            orphans = [orphan for orphan in orphans if orphan.poll() is None]
            time.sleep(0.1)
        for orphan in orphans:
            orphan.kill()
        for job in ending:  # after their groups are gone: their last checkpoint is written
            if job.state is _S.CANCELLING:
                self._finish_cancel(job.id)
                continue
            self.checkpoints.store_new(job.id)
            self._transition(job.id, _S.TIMED_OUT, error=_timed_out(
                job, self.checkpoints.store_stopped(job.id, {})))


def _past_time_limit(job: Job, now: float) -> bool:
    """Whether the job's current run has used up its time limit."""
    return (job.time_limit is not None and job.started_at is not None
            and now >= job.started_at + job.time_limit)


def _timed_out(job: Job, checkpoint: str) -> str:
    """A TIMED_OUT job's error: the limit, how long the run ran, what became of its final
    checkpoint (`DirectoryCheckpoints.store_stopped`)."""
    return (f"time limit: the run went past the job's time limit of {job.time_limit:g} s (ran "
            f"{time.time() - (job.started_at or time.time()):.1f} s); {checkpoint}")
