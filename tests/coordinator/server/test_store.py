"""The Store contract, run against MemoryStore and SqliteStore, plus SQLite's own promises:
WAL, schema versions and migrations, threads, and no loss across a kill -9."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from jobkit import TINY_SPEC, wait_for
from repo import REPO

import dptrain.coordinator.server.store.base as store_base
from dptrain.coordinator.api.errors import InvalidTransition, ValidationError
from dptrain.coordinator.api.records import CheckpointRecord, EventKind, JobState, new_job
from dptrain.coordinator.server.runner_settings import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import DB_FILE
from dptrain.coordinator.server.store import (
    SCHEMA_VERSION,
    AlreadyExists,
    CheckpointNotFound,
    JobNotFound,
    MemoryStore,
    SchemaError,
    SqliteStore,
    StateConflict,
    StoreClosed,
)
from dptrain.coordinator.server.store.sqlite import MIGRATIONS, _add_checkpoint_keep
from dptrain.worker.spec import JobSpec

SHA_A, SHA_B = "a" * 64, "b" * 64
Q, R, RS = JobState.QUEUED, JobState.RUNNING, JobState.RESTARTING


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "state.db")
    yield s
    s.close()


def _job(name="job", *, now=100.0, workers=2, **kw):
    return new_job(name, {"model": {"name": "mlp"}, "batch_size": 64, "workers": workers},
                   now=now, **kw)


def _ckpt(job_id, step, sha=SHA_A, created=200.0):
    return CheckpointRecord(job_id, step, sha, 1234, created, {"step": step, "files": {}})


class TestStoreContract:
    # -- jobs

    def test_create_then_get_returns_the_same_job(self, store):
        job = _job(priority=3, max_restarts=1, time_limit=60.0, token_hash="h")
        assert store.create_job(job) == job
        assert store.get_job(job.id) == job
        assert store.get_job(job.id).state is JobState.QUEUED

    def test_unknown_job_is_not_found(self, store):
        with pytest.raises(JobNotFound, match="j-000000000000"):
            store.get_job("j-000000000000")

    def test_duplicate_id_is_refused(self, store):
        job = store.create_job(_job())
        with pytest.raises(AlreadyExists):
            store.create_job(_job(job_id=job.id))

    def test_returned_records_are_copies(self, store):
        job = store.create_job(_job())
        job.spec["batch_size"] = 1
        store.get_job(job.id).spec["model"]["name"] = "changed"
        assert store.get_job(job.id).spec == {"model": {"name": "mlp"}, "batch_size": 64,
                                              "workers": 2}

    def test_every_committed_job_write_moves_its_revision_and_reads_do_not(self, store):
        # What JobMessages relies on to serve an unchanged job's kept message: a revision
        # that stays through reads and moves with each kind of job write, of that job only.
        a, b = store.create_job(_job("a")), store.create_job(_job("b"))
        seen = [(store.job_revision(a.id), store.jobs_revision)]
        b_revision = store.job_revision(b.id)

        def moved() -> bool:
            now = (store.job_revision(a.id), store.jobs_revision)
            changed = now[0] != seen[-1][0] and now[1] != seen[-1][1]
            seen.append(now)
            return changed

        store.get_job(a.id), store.list_jobs(), store.events(a.id)
        assert not moved()
        store.update_job(a.id, heartbeat_at=5.0)
        assert moved()
        store.transition(a.id, JobState.QUEUED, JobState.RUNNING, placement={"h": 2})
        assert moved()
        store.append_events(a.id, [("metrics", {"step": 3, "loss": 1.0})],
                            fields={"last_step": 3})
        assert moved()
        store.append_events(a.id, [("log", {"line": "no job field changes"})])
        assert not moved()
        store.transition(a.id, JobState.RUNNING, JobState.SUCCEEDED)
        assert moved()
        store.delete_job(a.id, [JobState.SUCCEEDED])
        assert moved()
        assert store.job_revision(b.id) == b_revision
        assert len({r for r, _ in seen}) == len(seen) - 2  # no revision came back

    def test_forgotten_revisions_never_match_an_earlier_one(self, store, monkeypatch):
        # Past _JOB_REVISIONS jobs, every job's revision starts anew, above all earlier ones.
        monkeypatch.setattr(store_base, "_JOB_REVISIONS", 2)
        jobs = [store.create_job(_job(f"j{i}")) for i in range(2)]
        before = {j.id: store.job_revision(j.id) for j in jobs}
        store.create_job(_job("third"))  # the 3rd tag: the others are forgotten
        after = {j.id: store.job_revision(j.id) for j in jobs}
        assert all(after[k] > max(before.values()) for k in after)

    def test_list_jobs_is_newest_first_with_id_breaking_ties(self, store):
        ids = [store.create_job(_job(now=t)).id for t in (1.0, 3.0, 2.0, 2.0)]
        listed = [j.id for j in store.list_jobs()[0]]
        ties = sorted(ids[2:], reverse=True)
        assert listed == [ids[1], *ties, ids[0]]

    def test_paging_sees_every_job_once_even_while_jobs_arrive(self, store):
        ids = {store.create_job(_job(now=float(t % 4))).id for t in range(11)}
        seen, token, pages = [], "", 0
        while True:
            page, token = store.list_jobs(page_size=3, page_token=token)
            seen += [j.id for j in page]
            pages += 1
            store.create_job(_job(now=50.0 + pages))  # newer: belongs before the first page
            if not token:
                break
        assert pages == 4 and len(seen) == 11 and set(seen) == ids

    def test_list_filters_by_state(self, store):
        a, b = store.create_job(_job(now=1.0)), store.create_job(_job(now=2.0))
        store.transition(b.id, Q, R)
        assert [j.id for j in store.list_jobs([R])[0]] == [b.id]
        assert [j.id for j in store.list_jobs({Q, R})[0]] == [b.id, a.id]
        assert store.list_jobs([JobState.FAILED]) == ([], "")

    def test_list_page_size_defaults_and_caps(self, store, monkeypatch):
        for t in range(5):
            store.create_job(_job(now=float(t)))
        monkeypatch.setattr(store_base, "DEFAULT_PAGE_SIZE", 2)
        monkeypatch.setattr(store_base, "MAX_PAGE_SIZE", 3)
        assert len(store.list_jobs(page_size=0)[0]) == 2
        assert len(store.list_jobs(page_size=99)[0]) == 3
        assert len(store.all_jobs()) == 5

    @pytest.mark.parametrize("kw, field", [({"page_size": -1}, "page_size"),
                                           ({"page_token": "not a token"}, "page_token"),
                                           ({"page_token": "bm9waXBl"}, "page_token")])
    def test_bad_listing_arguments_name_the_field(self, store, kw, field):
        with pytest.raises(ValidationError) as e:
            store.list_jobs(**kw)
        assert e.value.field == field and field in str(e.value)

    def test_count_by_state_covers_every_state(self, store):
        a = store.create_job(_job())
        store.create_job(_job())
        store.transition(a.id, Q, R)
        assert store.count_by_state() == {**dict.fromkeys(JobState, 0), Q: 1, R: 1}

    # -- transitions

    def test_transition_bookkeeping(self, store):
        job = store.create_job(_job(now=10.0))
        running = store.transition(job.id, Q, R, now=20.0, placement={"h1": 2})
        assert (running.state, running.started_at, running.heartbeat_at) == (R, 20.0, 20.0)
        assert running.placement == (("h1", 2),)
        restarting = store.transition(job.id, R, RS, now=30.0, error="rank 1 died", exit_code=9)
        assert (restarting.restarts, restarting.placement) == (1, ())
        again = store.transition(job.id, RS, R, now=40.0, placement=[("h2", 2)])
        assert (again.started_at, again.restarts) == (40.0, 1)
        done = store.transition(job.id, R, JobState.SUCCEEDED, now=50.0, error="", exit_code=0)
        assert (done.finished_at, done.placement) == (50.0, ())
        assert store.get_job(job.id) == done

    def test_transitions_are_logged_as_state_events(self, store):
        job = store.create_job(_job(now=10.0))
        store.transition(job.id, Q, R, now=20.0)
        store.transition(job.id, R, JobState.FAILED, now=30.0, error="boom", exit_code=1)
        events = store.events(job.id)
        assert [(e.seq, e.time, e.kind) for e in events] == [
            (1, 10.0, EventKind.STATE), (2, 20.0, EventKind.STATE), (3, 30.0, EventKind.STATE)]
        assert [e.payload for e in events] == [
            {"state": "QUEUED"}, {"state": "RUNNING", "previous": "QUEUED"},
            {"state": "FAILED", "previous": "RUNNING", "error": "boom", "exit_code": 1}]

    def test_transition_from_an_unexpected_state_is_a_conflict(self, store):
        job = store.create_job(_job())
        store.transition(job.id, Q, JobState.CANCELLED)
        with pytest.raises(StateConflict, match="is CANCELLED, expected one of: RUNNING") as e:
            store.transition(job.id, [R], JobState.SUCCEEDED)
        assert e.value.actual is JobState.CANCELLED
        assert len(store.events(job.id)) == 2

    def test_forbidden_transition_is_refused_before_reading(self, store):
        with pytest.raises(InvalidTransition, match="from SUCCEEDED to RUNNING"):
            store.transition("j-000000000000", JobState.SUCCEEDED, R)
        job = store.create_job(_job())
        with pytest.raises(InvalidTransition, match="QUEUED to RESTARTING"):
            store.transition(job.id, Q, RS)

    def test_failed_transition_changes_nothing(self, store):
        job = store.create_job(_job())
        with pytest.raises(ValidationError, match="exit_code"):
            store.transition(job.id, Q, R, exit_code="nine")
        with pytest.raises(ValidationError, match="not a job field"):
            store.transition(job.id, Q, R, name="renamed")
        assert store.get_job(job.id) == job and len(store.events(job.id)) == 1

    def test_compare_and_set_has_exactly_one_winner(self, store):
        job = store.create_job(_job())
        outcomes, barrier = [], threading.Barrier(8)

        def attempt():
            barrier.wait()
            try:
                store.transition(job.id, Q, R)
                outcomes.append("won")
            except StateConflict:
                outcomes.append("lost")

        threads = [threading.Thread(target=attempt) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["lost"] * 7 + ["won"]
        assert [e.payload["state"] for e in store.events(job.id)] == ["QUEUED", "RUNNING"]

    def test_update_job_changes_fields_but_not_state(self, store):
        job = store.create_job(_job())
        updated = store.update_job(job.id, heartbeat_at=5.0, last_step=7, metrics={"loss": 0.5})
        assert store.get_job(job.id) == updated
        assert (updated.heartbeat_at, updated.last_step, updated.metrics) == (
            5.0, 7, {"loss": 0.5})
        with pytest.raises(ValidationError, match="state"):
            store.update_job(job.id, state=R)
        with pytest.raises(ValidationError, match="last_step: must be >= 0, got -1"):
            store.update_job(job.id, last_step=-1)
        with pytest.raises(StateConflict):
            store.update_job(job.id, states=[R], heartbeat_at=6.0)
        assert store.get_job(job.id) == updated
        with pytest.raises(JobNotFound):
            store.update_job("j-000000000000", heartbeat_at=1.0)

    # -- events

    def test_events_are_numbered_per_job(self, store):
        a, b = store.create_job(_job()), store.create_job(_job())
        assert store.append_event(a.id, "log", {"line": "hello"}) == 2
        assert store.append_event(b.id, EventKind.METRICS, {"step": 1, "loss": 2.0}) == 2
        assert store.append_events(a.id, [("metrics", {"step": 1}), ("log", {"line": "x"})],
                                   now=7.0) == [3, 4]
        events = store.events(a.id, after_seq=1)
        assert [(e.seq, e.kind, e.payload) for e in events] == [
            (2, EventKind.LOG, {"line": "hello"}), (3, EventKind.METRICS, {"step": 1}),
            (4, EventKind.LOG, {"line": "x"})]
        assert events[1].time == 7.0 and events[1].job_id == a.id
        assert [e.seq for e in store.events(a.id, after_seq=2, limit=1)] == [3]
        assert store.events(a.id, after_seq=4) == []

    def test_bad_events_are_refused_and_use_no_number(self, store):
        job = store.create_job(_job())
        with pytest.raises(ValidationError, match="kind: must be one of"):
            store.append_event(job.id, "gossip", {})
        with pytest.raises(ValidationError, match="payload: must be JSON-serialisable"):
            store.append_event(job.id, "log", {"line": object()})
        with pytest.raises(JobNotFound):
            store.append_event("j-000000000000", "log", {})
        with pytest.raises(JobNotFound):
            store.events("j-000000000000")
        with pytest.raises(ValidationError, match="after_seq"):
            store.events(job.id, after_seq=-1)
        assert store.append_event(job.id, "log", {"line": "ok"}) == 2

    def test_progress_report_is_one_transaction(self, store):
        job = store.create_job(_job())
        store.transition(job.id, Q, R)
        store.append_events(job.id, [("metrics", {"step": 3, "loss": 1.5})], states=[R],
                            fields={"last_step": 3, "metrics": {"loss": 1.5}})
        assert (store.get_job(job.id).last_step, store.get_job(job.id).metrics) == (
            3, {"loss": 1.5})
        store.transition(job.id, R, JobState.CANCELLED)
        with pytest.raises(StateConflict):
            store.append_events(job.id, [("metrics", {"step": 4})], states=[R],
                                fields={"last_step": 4})
        with pytest.raises(ValidationError):
            store.append_events(job.id, [("metrics", {"step": 4})], fields={"bogus": 1})
        assert store.get_job(job.id).last_step == 3 and len(store.events(job.id)) == 4

    def test_wait_events_returns_at_once_when_there_are_events(self, store):
        job = store.create_job(_job())
        assert [e.seq for e in store.wait_events(job.id, 0, timeout=5.0)] == [1]

    def test_wait_events_wakes_on_the_next_event(self, store):
        job = store.create_job(_job())
        timer = threading.Timer(0.05, store.append_event, (job.id, "log", {"line": "late"}))
        timer.start()
        start = time.monotonic()
        events = store.wait_events(job.id, after_seq=1, timeout=10.0)
        timer.join()
        assert [e.payload for e in events] == [{"line": "late"}]
        assert time.monotonic() - start < 5.0

    def test_wait_events_times_out_empty_and_close_wakes_it(self, store):
        job = store.create_job(_job())
        assert store.wait_events(job.id, after_seq=1, timeout=0.05) == []
        timer = threading.Timer(0.05, store.close)
        timer.start()
        start = time.monotonic()
        assert store.wait_events(job.id, after_seq=1, timeout=10.0) == []
        timer.join()
        assert time.monotonic() - start < 5.0

    # -- checkpoints

    def test_checkpoints_add_list_get_delete(self, store):
        job = store.create_job(_job())
        for step, sha in ((100, SHA_A), (300, SHA_B), (200, SHA_A)):
            store.add_checkpoint(_ckpt(job.id, step, sha))
        assert [c.step for c in store.list_checkpoints(job.id)] == [100, 200, 300]
        assert store.get_checkpoint(job.id) == _ckpt(job.id, 300, SHA_B)
        assert store.get_checkpoint(job.id, 200).manifest == {"step": 200, "files": {}}
        other = store.create_job(_job())
        store.add_checkpoint(_ckpt(other.id, 5, SHA_B))
        every = sorted([(job.id, 100), (job.id, 200), (job.id, 300), (other.id, 5)])
        assert [(c.job_id, c.step) for c in store.all_checkpoints()] == every
        assert store.delete_checkpoint(job.id, 300).sha256 == SHA_B
        assert [(c.job_id, c.step, c.sha256) for c in store.all_checkpoints()] == sorted(
            [(job.id, 100, SHA_A), (job.id, 200, SHA_A), (other.id, 5, SHA_B)])
        assert store.get_checkpoint(job.id).step == 200
        with pytest.raises(CheckpointNotFound, match="no checkpoint at step 300"):
            store.get_checkpoint(job.id, 300)
        with pytest.raises(CheckpointNotFound):
            store.delete_checkpoint(job.id, 300)

    def test_checkpoint_is_logged_and_a_retry_is_a_no_op(self, store):
        job = store.create_job(_job())
        store.add_checkpoint(_ckpt(job.id, 100))
        store.add_checkpoint(_ckpt(job.id, 100, created=999.0))
        with pytest.raises(AlreadyExists, match="different checkpoint at step 100"):
            store.add_checkpoint(_ckpt(job.id, 100, SHA_B))
        events = store.events(job.id)
        assert [e.payload for e in events[1:]] == [{"step": 100, "sha256": SHA_A, "size": 1234}]
        assert store.get_checkpoint(job.id).created_at == 200.0

    def test_checkpoint_only_while_the_job_is_in_the_given_states(self, store):
        job = store.create_job(_job())
        store.transition(job.id, Q, R)
        store.add_checkpoint(_ckpt(job.id, 10), states=[R, RS])
        store.transition(job.id, R, JobState.CANCELLED)
        with pytest.raises(StateConflict, match="is CANCELLED, expected one of: RESTARTING, "
                                                "RUNNING"):
            store.add_checkpoint(_ckpt(job.id, 20), states=[R, RS])
        assert [c.step for c in store.list_checkpoints(job.id)] == [10]
        kinds = [e.kind for e in store.events(job.id)]
        assert kinds.count(EventKind.CHECKPOINT) == 1  # the refused one left no event either
        store.add_checkpoint(_ckpt(job.id, 20))  # no condition: recorded whatever the state
        assert [c.step for c in store.list_checkpoints(job.id)] == [10, 20]

    def test_a_kept_mark_is_stored_and_removed(self, store):
        job = store.create_job(_job())
        store.add_checkpoint(_ckpt(job.id, 10))
        store.add_checkpoint(_ckpt(job.id, 20, SHA_B))
        assert store.set_checkpoint_keep(job.id, 10, True).keep is True
        assert [(c.step, c.keep) for c in store.list_checkpoints(job.id)] == [(10, True),
                                                                              (20, False)]
        assert store.get_checkpoint(job.id, 10).keep is True
        assert store.set_checkpoint_keep(job.id, 10, False).keep is False
        assert not any(c.keep for c in store.all_checkpoints())
        with pytest.raises(CheckpointNotFound):
            store.set_checkpoint_keep(job.id, 30, True)
        with pytest.raises(JobNotFound):
            store.set_checkpoint_keep("j-000000000000", 10, True)
        with pytest.raises(ValidationError, match="keep: must be true or false"):
            store.set_checkpoint_keep(job.id, 10, 1)

    def test_deleting_a_job_removes_its_events_and_checkpoints_only(self, store):
        job, other = store.create_job(_job()), store.create_job(_job())
        for j in (job, other):
            store.add_checkpoint(_ckpt(j.id, 10))
            store.append_event(j.id, "log", {"line": "hi"})
        with pytest.raises(StateConflict, match="is QUEUED"):
            store.delete_job(job.id, [JobState.CANCELLED])
        store.transition(job.id, Q, JobState.CANCELLED)
        deleted, records = store.delete_job(job.id, [JobState.CANCELLED])
        assert (deleted.id, [(r.job_id, r.step) for r in records]) == (job.id, [(job.id, 10)])
        with pytest.raises(JobNotFound):
            store.get_job(job.id)
        with pytest.raises(JobNotFound):
            store.events(job.id)
        with pytest.raises(JobNotFound):
            store.delete_job(job.id, [JobState.CANCELLED])
        assert [(c.job_id, c.step) for c in store.all_checkpoints()] == [(other.id, 10)]
        assert [j.id for j in store.all_jobs()] == [other.id]
        assert len(store.events(other.id)) == 3
        again = store.create_job(_job(job_id=job.id))  # its id is free again, events from 1
        assert [e.seq for e in store.events(again.id)] == [1]

    def test_checkpoint_errors(self, store):
        job = store.create_job(_job())
        with pytest.raises(CheckpointNotFound, match="has no checkpoints"):
            store.get_checkpoint(job.id)
        with pytest.raises(JobNotFound):
            store.add_checkpoint(_ckpt("j-000000000000", 1))
        with pytest.raises(JobNotFound):
            store.list_checkpoints("j-000000000000")
        with pytest.raises(JobNotFound):
            store.get_checkpoint("j-000000000000")
        with pytest.raises(ValidationError, match="sha256"):
            store.add_checkpoint(_ckpt(job.id, 1, "XYZ"))
        with pytest.raises(ValidationError, match="step: must be >= 0"):
            store.add_checkpoint(_ckpt(job.id, -5))
        assert store.list_checkpoints(job.id) == []

    def test_closed_store_refuses_work(self, store):
        job = store.create_job(_job())
        store.close()
        store.close()
        with pytest.raises(StoreClosed):
            store.get_job(job.id)
        with pytest.raises(StoreClosed):
            store.create_job(_job())


# ---------------------------------------------------------------- SQLite only

def test_sqlite_uses_wal_full_sync_and_foreign_keys(tmp_path):
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        store.create_job(_job())
        with store._connection() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            raw.execute("PRAGMA foreign_keys = ON")
            with pytest.raises(sqlite3.IntegrityError):
                raw.execute("INSERT INTO events VALUES ('j-000000000000', 1, 0, 'log', '{}')")
        finally:
            raw.close()


def test_sqlite_files_are_private_whatever_the_umask(tmp_path):
    def modes() -> dict[str, int]:
        return {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}

    previous = os.umask(0)
    try:
        with SqliteStore(tmp_path / "new.db") as store:
            store.create_job(_job())
            assert modes() == {"new.db": 0o600, "new.db-wal": 0o600, "new.db-shm": 0o600}
        old = tmp_path / "old.db"  # left readable by others by an earlier version
        SqliteStore(old).close()
        old.chmod(0o644)
        with SqliteStore(old):
            assert modes()["old.db"] == 0o600
    finally:
        os.umask(previous)


def test_sqlite_keeps_everything_across_reopen(tmp_path):
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        job = store.create_job(_job(time_limit=30.0))
        job = store.transition(job.id, Q, R, now=5.0, placement={"a": 1, "b": 1},
                               metrics={"loss": float("nan")})
        store.add_checkpoint(_ckpt(job.id, 10))
    with SqliteStore(path) as store:
        again = store.get_job(job.id)
        assert again.metrics["loss"] != again.metrics["loss"]  # NaN survives
        assert again == job.__class__(**{**job.__dict__, "metrics": again.metrics})
        assert store.append_event(job.id, "log", {"line": "after reopen"}) == 4
        assert store.get_checkpoint(job.id).step == 10
        assert store.schema_version == SCHEMA_VERSION


def test_sqlite_migration_hook_runs_new_steps_once(tmp_path):
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    calls = []

    def add_column(conn):
        calls.append(1)
        conn.execute("ALTER TABLE jobs ADD COLUMN note TEXT")

    with SqliteStore(path, migrations=(*MIGRATIONS, add_column)) as store:
        assert store.schema_version == SCHEMA_VERSION + 1
    SqliteStore(path, migrations=(*MIGRATIONS, add_column)).close()
    assert calls == [1]
    with pytest.raises(SchemaError, match=f"version {SCHEMA_VERSION + 1} is newer"):
        SqliteStore(path)


def test_sqlite_failed_migration_leaves_the_database_unchanged(tmp_path):
    path = tmp_path / "state.db"
    SqliteStore(path).close()

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    with pytest.raises(RuntimeError, match="migration bug"):
        SqliteStore(path, migrations=(*MIGRATIONS, broken))
    with SqliteStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        with store._connection() as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "half_done" not in tables


def write_version_1_database(path, job_spec: dict, job_id: str = "j-0123456789ab") -> None:
    """A database as version 1 of the schema left it: one QUEUED job whose ``workers`` column
    repeats its spec's (as every version-1 coordinator wrote them)."""
    conn = sqlite3.connect(path)
    MIGRATIONS[0](conn)
    conn.execute(
        "INSERT INTO jobs (id, name, spec, workers, submitted_at, priority, state, "
        "max_restarts, restarts, error, metrics, placement, token_hash) "
        "VALUES (?, ?, ?, ?, 100.0, 0, 'QUEUED', 0, 0, '', '{}', '[]', '')",
        (job_id, job_spec["name"], json.dumps(job_spec, sort_keys=True), job_spec["workers"]))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def test_a_version_1_database_opens_and_reads_workers_from_the_spec(tmp_path):
    path = tmp_path / "state.db"
    write_version_1_database(path, {"name": "old", "batch_size": 64, "workers": 4})
    with SqliteStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        job = store.get_job("j-0123456789ab")
        assert (job.name, job.workers, job.state) == ("old", 4, Q)
        with store._connection() as conn:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        assert "workers" not in columns and "spec" in columns
        new = store.create_job(_job("new", workers=3))
        assert store.get_job(new.id).workers == 3


def test_checkpoints_stored_before_the_keep_mark_open_unmarked(tmp_path):
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    before = MIGRATIONS[:MIGRATIONS.index(_add_checkpoint_keep)]
    for step in before:
        step(conn)
    conn.execute(
        "INSERT INTO jobs (id, name, spec, submitted_at, priority, state, max_restarts, "
        "restarts, error, metrics, placement, token_hash) VALUES ('j-0123456789ab', 'old', "
        "'{}', 100.0, 0, 'SUCCEEDED', 0, 0, '', '{}', '[]', '')")
    conn.execute("INSERT INTO checkpoints (job_id, step, sha256, size, created_at, manifest) "
                 f"VALUES ('j-0123456789ab', 7, '{SHA_A}', 10, 150.0, '{{}}')")
    conn.execute(f"PRAGMA user_version = {len(before)}")
    conn.commit()
    conn.close()
    with SqliteStore(path) as store:
        assert store.get_checkpoint("j-0123456789ab", 7).keep is False
        store.set_checkpoint_keep("j-0123456789ab", 7, True)
    with SqliteStore(path) as store:
        assert store.get_checkpoint("j-0123456789ab", 7).keep is True


@pytest.mark.mpi
def test_a_job_queued_in_a_version_1_database_runs(serve_coordinator, state_dir):
    state_dir.mkdir(mode=0o700)
    write_version_1_database(state_dir / DB_FILE, JobSpec.from_dict(TINY_SPEC).to_dict())
    server = serve_coordinator(cluster=Cluster.local(2), runner=RunnerSettings(state_dir))
    job = wait_for(lambda: (j := server.store.get_job("j-0123456789ab")).state.terminal and j,
                   timeout=300)
    assert (job.state, job.exit_code, job.workers) == (JobState.SUCCEEDED, 0, 2), job.error
    assert job.last_step == TINY_SPEC["max_steps"]


def test_sqlite_is_safe_from_many_threads(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    shared = store.create_job(_job())
    errors, barrier = [], threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for k in range(10):
                store.create_job(_job(f"t{i}-{k}"))
                store.append_event(shared.id, "log", {"thread": i, "k": k})
                store.list_jobs(page_size=5)
                store.events(shared.id, after_seq=k)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    events = store.events(shared.id)
    assert [e.seq for e in events] == list(range(1, 82))
    assert sorted((e.payload["thread"], e.payload["k"]) for e in events[1:]) == [
        (i, k) for i in range(8) for k in range(10)]
    assert len(store.all_jobs()) == 81
    store.close()
    assert store._open == []  # every pooled connection closed


class _CountingCommits(SqliteStore):
    """Records how many writes each commit carried."""

    def __init__(self, path):
        super().__init__(path)
        self.commits = []

    def _commit(self, conn, group):
        self.commits.append(len(group))
        super()._commit(conn, group)


def _queued(store, calls):
    """Start one thread per call (each makes one write) while the committer is held inside a
    write of its own (a group of one), wait until all of them are queued, let it go; return
    their results (a value or an exception)."""
    results = [None] * len(calls)
    inside, release = threading.Event(), threading.Event()

    def hold(tx):
        inside.set()
        release.wait()

    def call(i):
        try:
            results[i] = calls[i]()
        except Exception as e:
            results[i] = e

    holder = threading.Thread(target=store._write, args=(hold,))
    holder.start()
    inside.wait()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    while len(store._writes) < len(calls):
        time.sleep(0.001)
    release.set()
    for t in [holder, *threads]:
        t.join()
    return results


def _queued_writers(store, jobs):
    """`_queued` with one create_job per job."""
    return _queued(store, [functools.partial(store.create_job, job) for job in jobs])


def _rows(path):
    """The jobs' ``(id, name, spec)`` and the events' ``(job_id, seq, kind, payload)``, read
    with a connection of their own, specs and payloads parsed."""
    with sqlite3.connect(path) as other:
        jobs = {(i, n, json.dumps(json.loads(s), sort_keys=True))
                for i, n, s in other.execute("SELECT id, name, spec FROM jobs")}
        events = {(j, q, k, json.dumps(json.loads(p), sort_keys=True))
                  for j, q, k, p in other.execute("SELECT job_id, seq, kind, payload FROM "
                                                  "events")}
    return jobs, events


def _first_rows(job):
    """What a new job's rows hold, written out by hand."""
    return ((job.id, job.name, json.dumps(job.spec, sort_keys=True)),
            (job.id, 1, "state", '{"state": "QUEUED"}'))


def test_sqlite_a_group_of_new_jobs_keeps_each_writes_rule(tmp_path):
    # New jobs queued together are written with one statement per table: each is stored
    # with its first event, a taken id (stored, or taken earlier in the same group) is
    # refused alone, and the group's other writes, a failing one included, keep theirs.
    store = _CountingCommits(tmp_path / "state.db")
    old = store.create_job(_job("old", now=1.0))
    fresh = [_job(f"n{i}", now=10.0 + i) for i in range(4)]
    twin = new_job("twin", {"workers": 1}, job_id=fresh[0].id, now=20.0)
    taken = new_job("taken", {"workers": 1}, job_id=old.id, now=21.0)
    calls = [functools.partial(store.create_job, job) for job in [*fresh, twin, taken]]
    calls += [lambda: store.append_events(old.id, [("log", {"line": "beside"})]),
              lambda: store.transition(old.id, JobState.RUNNING, JobState.SUCCEEDED)]
    results = _queued(store, calls)
    assert store.commits == [1, 1, 8]
    # The first of fresh[0] and its twin to be queued is stored, the other refused.
    first, second = (0, 4) if isinstance(results[4], AlreadyExists) else (4, 0)
    assert isinstance(results[second], AlreadyExists)
    assert results[first] == [*fresh, twin][first]
    assert results[1:4] == fresh[1:4]
    assert isinstance(results[5], AlreadyExists)
    assert results[6] == [2]
    assert isinstance(results[7], StateConflict)
    stored = [old, *fresh[1:4], [*fresh, twin][first]]
    jobs, events = _rows(tmp_path / "state.db")
    assert jobs == {_first_rows(job)[0] for job in stored}
    assert events == {_first_rows(job)[1] for job in stored} | {
        (old.id, 2, "log", '{"line": "beside"}')}
    assert store.get_job(old.id).state is JobState.QUEUED
    store.close()


def test_sqlite_a_new_job_sqlite_cannot_store_fails_alone_in_its_group(tmp_path):
    # A row the group's one statement cannot take (a name SQLite cannot bind) fails only
    # its own write: the group is run again, each write on its own, in the same commit.
    store = _CountingCommits(tmp_path / "state.db")
    good = [_job(f"g{i}", now=float(i)) for i in range(3)]
    bad = dataclasses.replace(_job("bad"), name=object())
    results = _queued_writers(store, [good[0], bad, *good[1:]])
    assert store.commits == [1, 4]
    assert isinstance(results[1], sqlite3.Error)
    assert [results[0], *results[2:]] == good
    jobs, events = _rows(tmp_path / "state.db")
    assert jobs == {_first_rows(job)[0] for job in good}
    assert events == {_first_rows(job)[1] for job in good}
    store.close()


def test_sqlite_queued_writers_share_one_commit_and_each_sees_it_done(tmp_path):
    store = _CountingCommits(tmp_path / "state.db")
    first = store.create_job(_job("first"))
    jobs = [_job(f"w{i}") for i in range(10)]
    jobs[4] = new_job("dup", {"x": 1, "workers": 1}, job_id=first.id)  # fails, alone
    results = _queued_writers(store, jobs)
    assert isinstance(results[4], AlreadyExists)
    assert [r.id for i, r in enumerate(results) if i != 4] == [
        j.id for i, j in enumerate(jobs) if i != 4]
    # The first job alone, the held write alone, then one fsync for the ten queued writes.
    assert store.commits == [1, 1, 10]
    # Committed as each call returned: a separate connection sees every row.
    with sqlite3.connect(tmp_path / "state.db") as other:
        names = sorted(n for (n,) in other.execute("SELECT name FROM jobs"))
    assert names == sorted(["first"] + [f"w{i}" for i in range(10) if i != 4])
    assert store.get_job(first.id).name == "first"
    store.close()


def test_sqlite_close_commits_the_writes_already_handed_over(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    inside, release = threading.Event(), threading.Event()
    results = []
    holder = threading.Thread(target=store._write, args=(lambda tx: (inside.set(),
                                                                     release.wait()),))
    holder.start()
    inside.wait()
    writers = [threading.Thread(target=lambda i=i: results.append(store.create_job(
        _job(f"w{i}")))) for i in range(5)]
    for t in writers:
        t.start()
    while len(store._writes) < 5:
        time.sleep(0.001)
    closing = threading.Thread(target=store.close)
    closing.start()
    while not store._closed:
        time.sleep(0.001)
    with pytest.raises(StoreClosed):
        store.create_job(_job("late"))
    release.set()
    for t in [holder, *writers, closing]:
        t.join()
    assert store._open == []  # the committer's connection too
    with SqliteStore(tmp_path / "state.db") as again:
        assert sorted(j.name for j in again.all_jobs()) == [f"w{i}" for i in range(5)]
    assert sorted(j.name for j in results) == [f"w{i}" for i in range(5)]


def test_sqlite_a_group_commits_after_max_group_writes(tmp_path):
    from dptrain.coordinator.server.store.sqlite import MAX_GROUP

    store = _CountingCommits(tmp_path / "state.db")
    results = _queued_writers(store, [_job(f"w{i}") for i in range(MAX_GROUP + 8)])
    assert all(not isinstance(r, Exception) for r in results)
    assert store.commits == [1, MAX_GROUP, 8]
    assert len(store.all_jobs()) == MAX_GROUP + 8
    store.close()


_WRITER = textwrap.dedent("""
    import sys, threading
    from dptrain.coordinator.api.records import JobState, new_job
    from dptrain.coordinator.server.store import SqliteStore

    store = SqliteStore(sys.argv[1])
    printing = threading.Lock()

    def write(thread):
        i = 0
        while True:
            job = store.create_job(new_job(f"job-{thread}-{i}", {"i": i, "workers": 1}))
            store.append_events(job.id, [("log", {"line": "x" * 200, "i": i})])
            store.transition(job.id, JobState.QUEUED, JobState.RUNNING)
            with printing:
                print(job.id, flush=True)  # only after the transition has committed
            i += 1

    for thread in range(1, int(sys.argv[2])):
        threading.Thread(target=write, args=(thread,), daemon=True).start()
    write(0)
""")


@pytest.mark.parametrize("threads", [1, 8])
def test_sqlite_loses_nothing_committed_when_killed(tmp_path, threads):
    # With 8 threads the writes share commits (the committer's groups): a kill lands with
    # several writes handed over and not yet answered, each of which must be whole or absent.
    path = tmp_path / "state.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(threads)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        committed = [proc.stdout.readline().strip() for _ in range(40)]
        time.sleep(0.013)  # kill at an arbitrary point, probably mid-transaction
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        committed += out.split()
    assert proc.returncode == -signal.SIGKILL, err
    assert all(committed), err

    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        raw.close()
    with SqliteStore(path) as store:
        for job_id in committed:
            assert store.get_job(job_id).state is JobState.RUNNING
        for job in store.all_jobs():  # the job in flight, if any, is whole or absent
            kinds = [e.kind.value for e in store.events(job.id)]
            expected = {JobState.QUEUED: [["state"], ["state", "log"]],
                        JobState.RUNNING: [["state", "log", "state"]]}[job.state]
            assert kinds in expected
        assert len(committed) == len(set(committed))
        # At most one job in flight per thread.
        assert len(committed) <= len(store.all_jobs()) <= len(committed) + threads
