"""The coordinator stores what a job's checkpoint directory holds: no checkpoint is lost.

Rank 0 writes every checkpoint into the job's checkpoint directory (``STATE/jobs/ID/
checkpoints``, the workers' ``--checkpoint-dir``) and uploads it. An upload can fail for good:
the coordinator was down when the checkpoint was written (a kill -9 and a restart), or the
attempt was over by the time it arrived (its token is dead). The directory, though, is on the
coordinator's own disk, or on the shared file system every host of a multi-host cluster
mounts, so the runner reads it itself, independently of the workers, the network and tokens:

* `ingest_new_checkpoints` stores every intact checkpoint newer than the newest stored one,
  oldest first, so retention keeps what an undisturbed run would have kept. The runner calls
  it when an attempt ends and before each relaunch, so the next attempt resumes from (and the
  user can download) the newest checkpoint.
* `store_final_checkpoint` makes sure a completed run's final checkpoint is stored and that its
  blobs verify: the condition for SUCCEEDED.
* `DirectoryCheckpoints` is the runner's use of both: it tells the job's events what it stored
  and says, for a job's error, what became of a final checkpoint (a completed run's, or the
  one a stopped run — cancelled, past its time limit — wrote while stopping).

Each checkpoint directory is verified (``worker.checkpoint_manifest.verify_checkpoint``) before
it is stored; an incomplete or damaged one is skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dptrain.coordinator.api.checkpoint_upload import read_checkpoint_directory
from dptrain.coordinator.api.errors import (
    BlobError,
    CheckpointNotFound,
    DiskFull,
    JobNotFound,
    StoreClosed,
    ValidationError,
)
from dptrain.coordinator.api.records import CheckpointRecord
from dptrain.coordinator.server.blobs import BlobStore
from dptrain.coordinator.server.checkpoint_store import store_checkpoint, verify_record
from dptrain.coordinator.server.store import Store
from dptrain.worker.checkpoint_manifest import (
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    verify_checkpoint,
)

__all__ = ["ingest_checkpoint", "ingest_new_checkpoints", "store_final_checkpoint",
           "DirectoryCheckpoints"]

log = logging.getLogger("dptrain.coordinator")


def ingest_checkpoint(job_id: str, path: str | os.PathLike, store: Store,
                      blobs: BlobStore) -> CheckpointRecord:
    """Store one checkpoint directory of the job, whatever the job's state.

    Args:
        job_id: the job.
        path: the directory (``step-XXXXXXXX``), verified first.
        store: the records.
        blobs: the files.

    Returns:
        The stored record (a different one stored at the same step is replaced).

    Raises:
        worker.checkpoint_manifest.CheckpointError: the directory is incomplete or damaged.
        OSError: it cannot be read.
        JobNotFound, ValidationError, ChecksumMismatch, BlobTooLarge: as
            `server.checkpoint_store.store_checkpoint`.
    """
    verify_checkpoint(path)
    upload, chunks = read_checkpoint_directory(job_id, path)
    return store_checkpoint(upload, chunks, store, blobs)[0]


def ingest_new_checkpoints(job_id: str, directory: str | os.PathLike, store: Store,
                           blobs: BlobStore) -> list[CheckpointRecord]:
    """Store the intact checkpoints of the job's directory newer than its newest stored one.

    Args:
        job_id: the job.
        directory: its checkpoint directory.
        store: the records.
        blobs: the files.

    Returns:
        The records stored, oldest first.

    Raises:
        JobNotFound: no such job.
    """
    stored = store.list_checkpoints(job_id)
    newest = stored[-1].step if stored else -1
    added = []
    for step, path in list_checkpoints(directory):
        if step <= newest:
            continue
        try:
            added.append(ingest_checkpoint(job_id, path, store, blobs))
        except (CheckpointError, ValidationError, BlobError, DiskFull, OSError,
                ValueError) as e:
            log.warning("job %s: checkpoint %s not stored: %s", job_id, path, e)
    return added


def store_final_checkpoint(job_id: str, step: int, directory: str | os.PathLike, store: Store,
                           blobs: BlobStore) -> bool:
    """Make sure the store holds the job's checkpoint at `step` and that its blobs verify,
    storing the directory's copy when it is missing or damaged.

    Args:
        job_id: the job.
        step: the completed run's final step.
        directory: its checkpoint directory.
        store: the records.
        blobs: the files.

    Returns:
        True when it had to be stored from the directory; False when it already was.

    Raises:
        worker.checkpoint_manifest.CheckpointError, OSError, ValidationError, BlobError, ValueError:
            it cannot be stored; the message says why.
    """
    try:
        verify_record(store.get_checkpoint(job_id, step), blobs)
        return False
    except (CheckpointNotFound, BlobError):
        pass  # never uploaded, or damaged since: store the directory's copy
    verify_record(ingest_checkpoint(job_id, Path(directory) / checkpoint_name(step), store,
                                    blobs), blobs)
    return True


class DirectoryCheckpoints:
    """The runner's storing from its jobs' checkpoint directories, told in the jobs' events.

    Args:
        store: the records.
        blobs: the files.
        directory_of: job id -> its checkpoint directory.
        event: ``event(job_id, line)`` appends a log line to the job's events.
    """

    def __init__(self, store: Store, blobs: BlobStore, directory_of: Callable[[str], Path],
                 event: Callable[[str, str], None]):
        self.store, self.blobs = store, blobs
        self.directory_of, self.event = directory_of, event

    def store_new(self, job_id: str) -> None:
        """Store the checkpoints in the job's directory newer than its newest stored one."""
        directory = self.directory_of(job_id)
        try:
            added = ingest_new_checkpoints(job_id, directory, self.store, self.blobs)
        except (JobNotFound, StoreClosed):
            return
        except Exception:  # the workers still resume from the directory: keep going
            log.exception("runner: storing job %s's checkpoints from %s failed", job_id,
                          directory)
            return
        for record in added:
            self.event(job_id, f"[dptrain] stored the checkpoint of step {record.step} from "
                               f"the job's checkpoint directory (the workers had not uploaded "
                               f"it)")

    def final_missing(self, job_id: str, final: dict[str, Any],
                      status: str = "completed") -> str | None:
        """None when the store holds the final checkpoint of a run that ended with `status`
        (its final JSON line, `final`, names the step), verified, storing it from the job's
        directory if need be; else what is wrong, to complete "the workers exited with code
        0, but ..."."""
        step = final.get("step")
        if final.get("status") != status or isinstance(step, bool) or not isinstance(
                step, int):
            return ("their final metrics (the JSON line naming the final step) are not in "
                    "worker.log, so the final checkpoint is unknown")
        directory = self.directory_of(job_id)
        try:
            if store_final_checkpoint(job_id, step, directory, self.store, self.blobs):
                self.event(job_id, f"[dptrain] stored the final checkpoint (step {step}) "
                                   f"from the job's checkpoint directory")
        except (CheckpointError, ValidationError, BlobError, DiskFull, OSError,
                ValueError) as e:
            return (f"the final checkpoint (step {step}) cannot be stored from "
                    f"{directory / checkpoint_name(step)}: {e}")
        return None

    def store_stopped(self, job_id: str, final: dict[str, Any]) -> str:
        """Store, verified, the checkpoint a stopped run wrote last (SIGTERM: the workers'
        final line says ``preempted`` and the step); returns what became of it, for the
        job's error (e.g. ``stopped after step 120, its checkpoint stored``)."""
        step = final.get("step")
        if final.get("status") == "preempted" and isinstance(step, int) and not isinstance(
                step, bool):
            missing = self.final_missing(job_id, final, "preempted")
            if missing is None:
                return f"stopped after step {step}, its checkpoint stored"
            return f"stopped after step {step}, but {missing}"
        try:  # killed before they wrote it, or recovered (the final line is not read)
            stored = self.store.list_checkpoints(job_id)
        except (JobNotFound, StoreClosed):
            stored = []
        return (f"the latest stored checkpoint is step {stored[-1].step}" if stored else
                "no checkpoint is stored")
