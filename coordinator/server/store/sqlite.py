"""`SqliteStore`: the `Store` contract in an SQLite database (the state directory's
``coordinator.db``).

Durability: WAL journal, ``synchronous=FULL``, every operation one transaction. Once a write
method returns, its change survives a kill -9 of the coordinator and a power cut.

Concurrency: readers take connections from a small pool, one per concurrent read (so the pool
grows to the server's thread count), each used by one thread at a time; they never wait for
writers (WAL gives each read a snapshot). Every write is run by one committer thread, which
owns the store's write connection and takes SQLite's write lock with ``BEGIN IMMEDIATE`` (a
second process, e.g. an admin tool, waits up to ``busy_timeout``).

Group commit: a write method hands its change (a function of the transaction) to the
committer and waits. The committer takes every change queued, up to `MAX_GROUP`, runs them in
one transaction, each inside a savepoint of it (a failing one rolls back only its own
changes; a group's new jobs share one statement per table instead, `_insert_new_jobs`),
commits them with one fsync, and only then wakes their callers: every write method returns
only once its change is committed. With fsync on every commit, writers queued on one
another's fsync were what limited SubmitJob under many clients; writers taking turns on a lock
to share a transaction cost as much again in hand-offs between threads (docs/benchmarks.md).

Full disk: a write whose transaction hits SQLITE_FULL (the state directory's file system, or
its quota, is full) is rolled back and raises `DiskFull` (RESOURCE_EXHAUSTED), naming the
database; reads go on, and writes succeed again once there is room.

Schema: ``PRAGMA user_version`` holds the schema version; `MIGRATIONS` is the list of steps, the
i-th upgrading version i to i+1. Opening a database runs the steps it lacks in one transaction
and refuses a database newer than this code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from dptrain.coordinator.api.errors import (
    CorruptRecord,
    DiskFull,
    SchemaError,
    StoreClosed,
    StoreError,
)
from dptrain.coordinator.api.records import (
    BUILTIN_ADMIN,
    CheckpointRecord,
    Event,
    EventKind,
    Job,
    JobState,
    User,
)
from dptrain.coordinator.server.private_files import open_private
from dptrain.coordinator.server.store.base import NewJob, Store, T, Transaction

__all__ = ["SqliteStore", "MIGRATIONS", "SCHEMA_VERSION", "MAX_GROUP", "Migration"]

log = logging.getLogger("dptrain.coordinator")

Migration = Callable[[sqlite3.Connection], None]

_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL from Python 3.11 on

MAX_GROUP = 32
"""At most this many writes share one commit (so that the first of a long queue of writers
does not wait for all of them)."""

_SCHEMA_1 = (
    """CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        workers INTEGER NOT NULL,
        submitted_at REAL NOT NULL,
        priority INTEGER NOT NULL,
        state TEXT NOT NULL,
        max_restarts INTEGER NOT NULL,
        time_limit REAL,
        started_at REAL,
        finished_at REAL,
        restarts INTEGER NOT NULL,
        error TEXT NOT NULL,
        exit_code INTEGER,
        heartbeat_at REAL,
        last_step INTEGER,
        metrics TEXT NOT NULL,
        placement TEXT NOT NULL,
        token_hash TEXT NOT NULL
    )""",
    "CREATE INDEX jobs_by_submission ON jobs (submitted_at, id)",
    "CREATE INDEX jobs_by_state ON jobs (state, submitted_at, id)",
    """CREATE TABLE events (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE checkpoints (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at REAL NOT NULL,
        manifest TEXT NOT NULL,
        PRIMARY KEY (job_id, step)
    ) WITHOUT ROWID""",
    "CREATE INDEX checkpoints_by_sha256 ON checkpoints (sha256)",
)


def _create_schema_1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_1:
        conn.execute(statement)


def _drop_workers_column(conn: sqlite3.Connection) -> None:
    """Version 2: a job's number of ranks is its spec's ``workers`` and nothing else, so the
    copy version 1 kept beside the spec goes (the spec of every stored job holds it)."""
    conn.execute("ALTER TABLE jobs DROP COLUMN workers")


def _add_checkpoint_keep(conn: sqlite3.Connection) -> None:
    """A checkpoint may be marked to be kept: retention never deletes it. Added as a column
    with a default, so every checkpoint stored before is unmarked; the step reads nothing but
    the ``checkpoints`` table, so it works wherever it lands in the list."""
    conn.execute("ALTER TABLE checkpoints ADD COLUMN keep INTEGER NOT NULL DEFAULT 0")


def _add_users(conn: sqlite3.Connection) -> None:
    """Users, each with the hash of its one valid token ("" once revoked), and the
    owner of every job; the jobs stored before belong to the built-in admin."""
    conn.execute(f"ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '{BUILTIN_ADMIN}'")
    conn.execute("CREATE INDEX jobs_by_owner ON jobs (owner, submitted_at, id)")
    conn.execute("""CREATE TABLE users (
        name TEXT PRIMARY KEY,
        admin INTEGER NOT NULL,
        created_at REAL NOT NULL,
        token_hash TEXT NOT NULL
    )""")
    conn.execute("CREATE INDEX users_by_token_hash ON users (token_hash)")


#: Schema steps: ``MIGRATIONS[i](connection)`` upgrades version i to i+1 inside the opening
#: transaction. Append a step (never edit a released one) to change the schema.
MIGRATIONS: tuple[Migration, ...] = (_create_schema_1, _drop_workers_column,
                                     _add_checkpoint_keep, _add_users)
SCHEMA_VERSION = len(MIGRATIONS)

_JOB_COLUMNS = tuple(f.name for f in dataclasses.fields(Job))
_JOB_SELECT = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"
_SUBMITTED_AT = _JOB_COLUMNS.index("submitted_at")
_JSON_COLUMNS = frozenset({"spec", "metrics", "placement"})
_CHECKPOINT_SELECT = ("SELECT job_id, step, sha256, size, created_at, manifest, keep "
                      "FROM checkpoints")
_USER_SELECT = "SELECT name, admin, created_at, token_hash FROM users"


_JOB_INSERT_HEAD = f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)})"
_EVENT_COLUMNS = ("job_id", "seq", "time", "kind", "payload")
_EVENT_INSERT_HEAD = f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)})"


@functools.cache
def _insert_rows(head: str, columns: int, rows: int) -> str:
    """``head VALUES (?, ...), ...``: `rows` rows of `columns` values in one statement."""
    row = f"({', '.join('?' * columns)})"
    return f"{head} VALUES {', '.join([row] * rows)}"


@functools.cache
def _ids_taken(count: int) -> str:
    return f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * count)})"


_JOB_INSERT = _insert_rows(_JOB_INSERT_HEAD, len(_JOB_COLUMNS), 1)
_JOB_UPDATE = (f"UPDATE jobs SET {', '.join(f'{name} = ?' for name in _JOB_COLUMNS[1:])} "
               "WHERE id = ?")


_EMPTY_TEXT = {dict: "{}", list: "[]", tuple: "[]"}
# json.dumps(value, sort_keys=True) without building an encoder at every call (json.dumps
# builds one whenever it is given an option): half of what encoding a spec costs.
_SORTED_JSON = json.JSONEncoder(sort_keys=True).encode


def _json_column(value: Any) -> str:
    # Most jobs' metrics and placement are empty: their text without the encoder.
    if not value and type(value) in _EMPTY_TEXT:
        return _EMPTY_TEXT[type(value)]
    return _SORTED_JSON(value)


def _event_values(e: Event) -> tuple:
    return (e.job_id, e.seq, e.time, e.kind.value, json.dumps(e.payload))


def _job_values(job: Job) -> tuple:
    values = []
    for name in _JOB_COLUMNS:
        value = getattr(job, name)
        if name in _JSON_COLUMNS:
            value = _json_column(value)
        elif name == "state":
            value = JobState(value).value
        values.append(value)
    return tuple(values)


_EMPTY_JSON = {"{}": dict, "[]": list}  # most jobs' metrics and placement: no parse needed


def _job_from_row(row: Sequence) -> Job:
    fields = dict(zip(_JOB_COLUMNS, row))
    try:
        for name in _JSON_COLUMNS:
            text = fields[name]
            empty = _EMPTY_JSON.get(text)
            fields[name] = empty() if empty is not None else json.loads(text)
        fields["placement"] = tuple((host, slots) for host, slots in fields["placement"])
        fields["state"] = JobState(fields["state"])
    except (ValueError, TypeError) as e:  # a row changed behind our back
        raise CorruptRecord(f"job {fields['id']!r}", e) from None
    return Job(**fields)


def _user_from_row(row: Sequence | None) -> User | None:
    if row is None:
        return None
    name, admin, created_at, token_hash = row
    return User(name, bool(admin), created_at, token_hash)


def _checkpoint_from_row(row: Sequence) -> CheckpointRecord:
    job_id, step, sha256, size, created_at, manifest, keep = row
    return CheckpointRecord(job_id, step, sha256, size, created_at, json.loads(manifest),
                            bool(keep))


class _SqlTransaction:
    """`coordinator.store.base.Transaction` over one connection inside BEGIN ... COMMIT."""

    def __init__(self, conn: sqlite3.Connection):
        self._c = conn

    def get_job(self, job_id: str) -> Job | None:
        row = self._c.execute(f"{_JOB_SELECT} WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    def insert_job(self, job: Job) -> None:
        self._c.execute(_JOB_INSERT, _job_values(job))

    def replace_job(self, job: Job) -> None:
        values = _job_values(job)
        self._c.execute(_JOB_UPDATE, (*values[1:], values[0]))

    def last_seq(self, job_id: str) -> int:
        row = self._c.execute("SELECT MAX(seq) FROM events WHERE job_id = ?", (job_id,))
        return row.fetchone()[0] or 0

    def insert_events(self, events: list[Event]) -> None:
        self._c.executemany(_insert_rows(_EVENT_INSERT_HEAD, len(_EVENT_COLUMNS), 1),
                            [_event_values(e) for e in events])

    def get_checkpoint(self, job_id: str, step: int | None) -> CheckpointRecord | None:
        if step is None:
            cursor = self._c.execute(f"{_CHECKPOINT_SELECT} WHERE job_id = ? "
                                     "ORDER BY step DESC LIMIT 1", (job_id,))
        else:
            cursor = self._c.execute(f"{_CHECKPOINT_SELECT} WHERE job_id = ? AND step = ?",
                                     (job_id, step))
        row = cursor.fetchone()
        return None if row is None else _checkpoint_from_row(row)

    def insert_checkpoint(self, r: CheckpointRecord) -> None:
        self._c.execute(
            "INSERT INTO checkpoints (job_id, step, sha256, size, created_at, manifest, keep) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (r.job_id, r.step, r.sha256, r.size, r.created_at, json.dumps(r.manifest),
             int(r.keep)))

    def delete_checkpoint(self, job_id: str, step: int) -> None:
        self._c.execute("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", (job_id, step))

    def set_checkpoint_keep(self, job_id: str, step: int, keep: bool) -> None:
        self._c.execute("UPDATE checkpoints SET keep = ? WHERE job_id = ? AND step = ?",
                        (int(keep), job_id, step))

    def delete_job(self, job_id: str) -> None:
        # Its events and checkpoint records go with it: ON DELETE CASCADE (foreign_keys = ON).
        self._c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def list_jobs(self, states: frozenset[JobState] | None, after: tuple[float, str] | None,
                  limit: int, owner: str | None = None) -> list[Job]:
        # An unreadable row is left out (and logged) rather than failing every listing; the
        # next rows are read in its place, so a page stays full and paging stays exact.
        jobs: list[Job] = []
        while len(jobs) < limit:
            wanted = limit - len(jobs)
            rows = self._job_rows(states, after, wanted, owner)
            for row in rows:
                try:
                    jobs.append(_job_from_row(row))
                except CorruptRecord as e:
                    log.warning("%s; it is left out of job listings", e)
            if len(rows) < wanted:
                break
            after = (rows[-1][_SUBMITTED_AT], rows[-1][0])
        return jobs

    def _job_rows(self, states: frozenset[JobState] | None, after: tuple[float, str] | None,
                  limit: int, owner: str | None) -> list[Sequence]:
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if states is not None:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += sorted(s.value for s in states)
        if after is not None:
            where.append("(submitted_at, id) < (?, ?)")
            params += after
        sql = _JOB_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY submitted_at DESC, id DESC LIMIT ?"
        return self._c.execute(sql, (*params, limit)).fetchall()

    def events(self, job_id: str, after_seq: int, limit: int) -> list[Event]:
        rows = self._c.execute(
            "SELECT job_id, seq, time, kind, payload FROM events WHERE job_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?", (job_id, after_seq, limit))
        return [Event(j, seq, t, EventKind(kind), json.loads(payload))
                for j, seq, t, kind, payload in rows]

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        rows = self._c.execute(f"{_CHECKPOINT_SELECT} WHERE job_id = ? ORDER BY step", (job_id,))
        return [_checkpoint_from_row(r) for r in rows]

    def count_by_state(self) -> dict[JobState, int]:
        rows = self._c.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {JobState(state): n for state, n in rows}

    def all_checkpoints(self) -> list[CheckpointRecord]:
        rows = self._c.execute(f"{_CHECKPOINT_SELECT} ORDER BY job_id, step")
        return [_checkpoint_from_row(r) for r in rows]

    def get_user(self, name: str) -> User | None:
        return _user_from_row(self._c.execute(f"{_USER_SELECT} WHERE name = ?",
                                              (name,)).fetchone())

    def user_by_token_hash(self, token_hash: str) -> User | None:
        return _user_from_row(self._c.execute(f"{_USER_SELECT} WHERE token_hash = ?",
                                              (token_hash,)).fetchone())

    def insert_user(self, user: User) -> None:
        self._c.execute("INSERT INTO users (name, admin, created_at, token_hash) "
                        "VALUES (?, ?, ?, ?)",
                        (user.name, int(user.admin), user.created_at, user.token_hash))

    def replace_user(self, user: User) -> None:
        self._c.execute("UPDATE users SET admin = ?, created_at = ?, token_hash = ? "
                        "WHERE name = ?",
                        (int(user.admin), user.created_at, user.token_hash, user.name))

    def list_users(self) -> list[User]:
        return [_user_from_row(r) for r in self._c.execute(f"{_USER_SELECT} ORDER BY name")]


class _Write:
    """One write handed to the committer: its change, then its outcome."""

    __slots__ = ("change", "result", "error", "done")

    def __init__(self, change: Callable[[Transaction], object]):
        self.change = change
        self.result: object = None
        self.error: BaseException | None = None
        # A bare lock, held until the committer is done with this write: waking a caller is
        # one release (an Event would take a condition and its lock as well).
        self.done = threading.Lock()
        self.done.acquire()


def _insert_new_jobs(conn: sqlite3.Connection, group: list[_Write]) -> list[_Write]:
    """Run the `NewJob` writes of `group` with one statement per table (which ids are taken,
    the jobs' rows, their first events' rows) and return the other writes.

    Each runs the rule of ``NewJob(job)(tx)``: a taken id (stored, or earlier in the group)
    gets `AlreadyExists`, the others are inserted with their first event. Three statements a
    group instead of five a write (a savepoint, the id's check, two inserts, the release):
    the committer's CPU a submission, under 50 writers, went from ~105 to ~87 µs
    (docs/benchmarks.md). Should a statement fail, the caller rolls the transaction back and
    runs every write on its own: nothing is set on a write before the last statement
    succeeded.
    """
    news = [w for w in group if isinstance(w.change, NewJob)]
    if not news:
        return group
    ids = [w.change.job.id for w in news]
    taken = {row[0] for row in conn.execute(_ids_taken(len(ids)), ids)}
    fresh, refused = [], []
    for write in news:
        change = write.change
        if change.job.id in taken:
            refused.append(write)
        else:
            taken.add(change.job.id)
            fresh.append(change)
    if fresh:
        conn.execute(_insert_rows(_JOB_INSERT_HEAD, len(_JOB_COLUMNS), len(fresh)),
                     [value for new in fresh for value in _job_values(new.job)])
        conn.execute(_insert_rows(_EVENT_INSERT_HEAD, len(_EVENT_COLUMNS), len(fresh)),
                     [value for new in fresh for value in _event_values(new.first_event())])
    for write in refused:
        write.error = write.change.exists()
    return [w for w in group if not isinstance(w.change, NewJob)]


class SqliteStore(Store):
    """A `Store` in an SQLite database file, safe for many threads of one process.

    Args:
        path: the database file; created (with its schema) when missing.
        synchronous: ``"FULL"`` (default) fsyncs the WAL at every commit, so a returned write
            survives a power cut; ``"NORMAL"`` survives a process crash (kill -9) but may
            lose the last commits on power loss, for fewer fsyncs. We choose FULL: our writes
            (submissions, state changes, progress reports) are few next to what fsync allows,
            and an acknowledged submission must not vanish.
        busy_timeout: seconds to wait for another process's write lock.
        migrations: the schema steps (default `MIGRATIONS`); a test or a future version hooks
            its own steps in here.

    Raises:
        SchemaError: the database is newer than `migrations` knows.
        StoreError: the file system cannot hold a WAL database (e.g. some network mounts).
    """

    def __init__(self, path: str | os.PathLike, *, synchronous: str = "FULL",
                 busy_timeout: float = 30.0, migrations: Sequence[Migration] = MIGRATIONS):
        super().__init__()
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous: must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        self.path = os.fspath(path)
        self._synchronous, self._busy_timeout = synchronous, busy_timeout
        self._pool_lock = threading.Lock()
        self._writes_lock = threading.Lock()
        self._writes_ready = threading.Condition(self._writes_lock)
        self._writes: deque[_Write] = deque()  # waiting for the committer (under _writes_lock)
        self._committer: threading.Thread | None = None  # started by the first write
        self._committer_idle = False  # it waits on _writes_ready (under _writes_lock)
        self._idle: list[sqlite3.Connection] = []
        self._open: list[sqlite3.Connection] = []
        # SQLite would create the file 0644 (0666 under umask 0); its -wal and -shm files
        # take the database's mode, so making the database 0600 keeps all three private.
        os.close(open_private(self.path, os.O_RDWR))
        conn = self._connect()
        try:
            self._migrate(conn, migrations)
        except BaseException:
            conn.close()
            raise
        self._open.append(conn)
        self._idle.append(conn)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, we issue BEGIN/COMMIT ourselves.
        # check_same_thread=False: pooled connections move between threads, one at a time.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot use the WAL journal here (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
        conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(migrations):
                raise SchemaError(f"{self.path}: database schema version {version} is newer than "
                                  f"this dptrain's {len(migrations)}; upgrade dptrain")
            for step in migrations[version:]:
                step(conn)
            if version != len(migrations):
                conn.execute(f"PRAGMA user_version = {len(migrations)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        """The database's ``PRAGMA user_version``."""
        with self._connection() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def _check_out(self) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise StoreClosed(f"the store {self.path} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
            with self._pool_lock:
                self._open.append(conn)
        return conn

    def _check_in(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if self._closed:  # closed while we worked: close() left this one to us
                self._open.remove(conn)
                conn.close()
            else:
                self._idle.append(conn)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn = self._check_out()
        try:
            yield conn
        finally:
            self._check_in(conn)

    def _write(self, change: Callable[[Transaction], T]) -> T:
        write = _Write(change)
        with self._writes_lock:
            if self._closed:
                raise StoreClosed(f"the store {self.path} is closed")
            if self._committer is None:
                self._committer = threading.Thread(
                    target=self._run_committer, args=(self._check_out(),),
                    name=f"sqlite-committer {self.path}", daemon=True)
                self._committer.start()
            self._writes.append(write)
            if self._committer_idle:
                self._writes_ready.notify()
        write.done.acquire()
        error = write.error
        if error is None:
            return write.result  # type: ignore[return-value]
        if isinstance(error, sqlite3.OperationalError) and (
                getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL
                or "database or disk is full" in str(error)):  # Python < 3.11 has no code
            # SQLITE_FULL: the transaction was rolled back, the database is as it was; say
            # so in the words of the blob store's full disk, not as an internal error.
            raise DiskFull(self.path) from None
        raise error

    def _run_committer(self, conn: sqlite3.Connection) -> None:
        """The committer thread: run the queued writes in groups until the store closes and
        nothing is queued."""
        try:
            while True:
                with self._writes_lock:
                    while not self._writes and not self._closed:
                        self._committer_idle = True
                        self._writes_ready.wait()
                        self._committer_idle = False
                    if not self._writes:
                        return
                    group = [self._writes.popleft()
                             for _ in range(min(len(self._writes), MAX_GROUP))]
                self._commit(conn, group)
        finally:
            self._check_in(conn)

    def _commit(self, conn: sqlite3.Connection, group: list[_Write]) -> None:
        """Run `group`'s changes in one transaction and commit it, then wake their callers.
        Should the transaction fail as a whole (its commit, or a full disk, which makes SQLite
        roll all of it back), every write of the group gets that error: none of them is
        stored."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            tx = _SqlTransaction(conn)
            if len(group) == 1:  # alone: its failure rolls back the transaction (below)
                group[0].result = group[0].change(tx)
            else:
                try:
                    others = _insert_new_jobs(conn, group)
                except Exception:
                    if not conn.in_transaction:  # rolled back whole: the group's too
                        raise
                    # Nothing of the group is written yet: start again, each on its own.
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    others = group
                for write in others:
                    conn.execute("SAVEPOINT write")
                    try:
                        write.result = write.change(tx)
                    except BaseException as e:
                        if not conn.in_transaction:  # rolled back whole: the group's too
                            raise
                        write.error = e
                        conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
            conn.execute("COMMIT")
        except BaseException as e:
            for write in group:
                write.error = e
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("%s: rolling back a failed group of writes", self.path)
        finally:
            for write in group:
                write.done.release()

    @contextmanager
    def _read(self) -> Iterator[_SqlTransaction]:
        with self._connection() as conn:
            conn.execute("BEGIN")  # one snapshot for the operation's few statements
            try:
                yield _SqlTransaction(conn)
            finally:
                conn.execute("ROLLBACK")

    def close(self) -> None:
        """Commit the writes already handed to the committer and end it; close every idle
        connection now and each busy one when its operation ends; wake `wait_events` callers.
        Later calls raise `StoreClosed`. Idempotent."""
        with self._pool_lock:
            self._closed = True
            for conn in self._idle:
                self._open.remove(conn)
                conn.close()
            self._idle.clear()
        with self._writes_lock:
            self._writes_ready.notify()
            committer = self._committer
        if committer is not None and committer is not threading.current_thread():
            committer.join()
        super().close()
