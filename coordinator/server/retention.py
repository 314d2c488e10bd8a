"""Deleting finished jobs, by request (`delete_job`, the ``DeleteJob`` RPC) and by age
(`retire_finished`, ``dptrain serve --retain-finished``), and the server's periodic upkeep
(`Upkeep`): plain functions of ``(request, state)``, no grpc here.

Deleting a job, in this order, so that a crash (even kill -9) anywhere leaves nothing a user
can see half-gone:

1. its records: the job, its events and its checkpoint records, in one transaction (GetJob is
   NOT_FOUND from then on);
2. its directory under ``STATE/jobs/`` (the worker log, the spec, the run record);
3. the blobs no remaining record refers to: its checkpoints' files and manifests, and its code
   archive unless another job names it (`checkpoint_store.free_blobs`). A blob a download is
   streaming goes when that download ends (`server.blobs.BlobLease`).

A crash after step 1 leaves unreferenced blobs and perhaps a directory without a job: the next
start's `collect_leftovers` removes both. Checkpoint retention inside a job (keep the newest
``checkpoint.keep`` and the marked ones) is `checkpoint_store.prune_job_checkpoints`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from dptrain.coordinator.api.errors import StateConflict
from dptrain.coordinator.api.records import TERMINAL_STATES, Job
from dptrain.coordinator.server.checkpoint_store import (
    free_blobs,
    record_blobs,
    referenced_blobs,
)
from dptrain.coordinator.server.code_listing import drop_stale_listings
from dptrain.coordinator.server.jobs import ServiceState
from dptrain.worker.spec import code_digest

__all__ = ["delete_job", "retire_finished", "collect_leftovers", "Upkeep", "DAY_S"]

log = logging.getLogger("dptrain.coordinator")

DAY_S = 86400.0


def delete_job(job_id: str, state: ServiceState) -> Job:
    """Delete a finished job: its records, its directory and the blobs only it used.

    Args:
        job_id: the job.
        state: the server.

    Returns:
        The job as it was.

    Raises:
        JobNotFound: no such job (NOT_FOUND).
        StateConflict: the job has not finished (FAILED_PRECONDITION): cancel it first.
    """
    job, candidates = _forget(job_id, state)
    free_blobs(state.store, state.blobs, candidates)
    return job


def _forget(job_id: str, state: ServiceState) -> tuple[Job, dict[str, float]]:
    """Steps 1 and 2 of a deletion; returns the job and the blobs step 3 may free (blob ->
    when the record that used it was made, for `checkpoint_store.free_blobs`)."""
    job, records = state.store.delete_job(job_id, TERMINAL_STATES)
    candidates = {name: record.created_at for record in records
                  for name in record_blobs(record).values()}
    if (code := code_digest(job.spec.get("code"))) is not None:
        candidates[code] = job.submitted_at
    if state.jobs_dir is not None:
        _remove_tree(state.jobs_dir / job.id)
    log.info("job %s deleted", job.id)
    return job, candidates


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:  # never made (a job that never ran), or removed already
        pass


def retire_finished(older_than_s: float, state: ServiceState, *,
                    now: float | None = None) -> list[str]:
    """Delete every finished job that finished more than `older_than_s` seconds ago.

    Args:
        older_than_s: the age, in seconds.
        state: the server.
        now: the current time (default: the clock).

    Returns:
        The ids of the jobs deleted.
    """
    cutoff = (time.time() if now is None else now) - older_than_s
    deleted, candidates = [], {}
    for job in state.store.all_jobs(TERMINAL_STATES):
        if job.finished_at is not None and job.finished_at < cutoff:
            try:
                freed = _forget(job.id, state)[1]
            except (LookupError, StateConflict):  # deleted by someone else meanwhile
                continue
            deleted.append(job.id)
            for name, made in freed.items():  # the last use of a blob is what counts
                candidates[name] = max(made, candidates.get(name, made))
    # Once for them all: what is referenced is read from the whole store each time.
    free_blobs(state.store, state.blobs, candidates)
    return deleted


def collect_leftovers(state: ServiceState, *, min_age: float) -> None:
    """Remove what deletions left behind: blobs no record refers to
    (`server.blobs.BlobStore.collect_garbage`, after a crash), the listings of code archives
    no longer stored (`code_listing.drop_stale_listings`) and job directories without a job.

    Args:
        state: the server.
        min_age: spare files younger than this many seconds (0 before the server serves:
            nothing can be in flight then).
    """
    state.blobs.collect_garbage(referenced_blobs(state.store), min_age=min_age)
    drop_stale_listings(state.code_listings, state.blobs, min_age=min_age)
    if state.jobs_dir is None or not state.jobs_dir.is_dir():
        return
    cutoff = time.time() - min_age
    known = {job.id for job in state.store.all_jobs()}
    for directory in state.jobs_dir.iterdir():
        # A job's directory is made after its record, so one without a record is a deleted
        # job's; the age test spares one whose job a racing submission is recording now.
        if (directory.name not in known and directory.is_dir()
                and directory.stat().st_mtime <= cutoff):
            _remove_tree(directory)


class Upkeep:
    """A thread that retires finished jobs older than `retain_finished_s` (when given) and
    collects garbage, at start and then every `interval_s` seconds.

    Args:
        state: the server.
        retain_finished_s: delete finished jobs this old; None: keep them.
        interval_s: seconds between rounds.
    """

    def __init__(self, state: ServiceState, retain_finished_s: float | None, *,
                 interval_s: float = 3600.0):
        self.state = state
        self.retain_finished_s = retain_finished_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dptrain-upkeep", daemon=True)

    def run_once(self) -> None:
        """One round: retire old jobs, then collect the garbage older than an hour."""
        if self.retain_finished_s is not None:
            retired = retire_finished(self.retain_finished_s, self.state)
            if retired:
                log.info("retention: deleted %d finished jobs older than %g days: %s",
                         len(retired), self.retain_finished_s / DAY_S, " ".join(retired))
        collect_leftovers(self.state, min_age=3600.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the store closed under us, a full disk: try again later
                if self._stop.is_set():
                    return
                log.exception("upkeep failed; trying again in %g s", self.interval_s)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Start the thread (its first round runs at once)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, waiting for a round in progress."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
