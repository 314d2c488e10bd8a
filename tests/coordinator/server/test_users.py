"""Users, their tokens and the jobs they own: the store's contract (MemoryStore and
SqliteStore), the migration of a version-2 database, token changes that count at the next call
of a REAL running server (no restart), and token files as clients in any language read them."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat

import pytest

from dptrain.coordinator.api.credentials import find_token, read_token_file, write_token_file
from dptrain.coordinator.api.errors import UserNotFound, ValidationError
from dptrain.coordinator.api.records import BUILTIN_ADMIN, User, new_job
from dptrain.coordinator.client.client import Client, ClientError
from dptrain.coordinator.server import users
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import DB_FILE
from dptrain.coordinator.server.store import AlreadyExists, MemoryStore, SqliteStore
from dptrain.coordinator.server.store.sqlite import MIGRATIONS
from dptrain.worker.spec import JobSpec

SPEC = {
    "name": "tiny", "model": {"name": "mlp", "args": {"in_features": 4, "hidden": [8],
                                                     "num_classes": 3}},
    "dataset": {"name": "synthetic", "args": {"n": 64, "features": 4, "classes": 3}},
    "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 8, "max_steps": 20, "workers": 2,
}


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "state.db")
    yield s
    s.close()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _job(owner: str, now: float):
    return new_job("job", {"model": {"name": "mlp"}, "batch_size": 64, "workers": 1}, now=now,
                   owner=owner)


# ---------------------------------------------------------------- the store

class TestUserStoreContract:
    def test_a_user_is_stored_and_found_by_its_token_hash(self, store):
        alice = User("alice", False, 100.0, _sha256("secret-a"))
        assert store.create_user(alice) == alice
        assert store.get_user("alice") == alice
        assert store.user_by_token_hash(_sha256("secret-a")) == alice
        assert store.user_by_token_hash(_sha256("secret-b")) is None
        assert store.user_by_token_hash("") is None

    def test_names_are_unique_and_checked(self, store):
        store.create_user(User("alice", False, 100.0, "h1"))
        with pytest.raises(AlreadyExists, match="user 'alice' already exists"):
            store.create_user(User("alice", True, 100.0, "h2"))
        for bad in ("", "Alice", "1abc", "a b", "a/b", "x" * 65):
            with pytest.raises(ValidationError, match="^name: must be 1-64 of a-z"):
                store.create_user(User(bad, False, 100.0, "h3"))
        assert [u.name for u in store.list_users()] == ["alice"]

    def test_a_new_token_replaces_the_old_and_revoking_leaves_none(self, store):
        store.create_user(User("bob", True, 100.0, _sha256("old")))
        assert store.user_by_token_hash(_sha256("old")).name == "bob"  # looked up: remembered
        store.set_user_token("bob", _sha256("new"))
        assert store.user_by_token_hash(_sha256("old")) is None
        assert store.user_by_token_hash(_sha256("new")).name == "bob"
        assert store.user_by_token_hash(_sha256("new")).name == "bob"
        revoked = store.set_user_token("bob", "")
        assert (revoked.active, revoked.admin) == (False, True)
        assert store.user_by_token_hash(_sha256("new")) is None
        with pytest.raises(UserNotFound, match="user 'nobody' not found"):
            store.set_user_token("nobody", "h")
        with pytest.raises(UserNotFound):
            store.get_user("nobody")

    def test_users_are_listed_by_name(self, store):
        for name in ("carol", "alice", "bob"):
            store.create_user(User(name, name == "bob", 100.0, name))
        assert [(u.name, u.admin) for u in store.list_users()] == [
            ("alice", False), ("bob", True), ("carol", False)]

    def test_jobs_keep_their_owner_and_list_by_owner(self, store):
        jobs = [store.create_job(_job(owner, now=100.0 + i))
                for i, owner in enumerate(["alice", "bob", "alice", "admin"])]
        assert [store.get_job(j.id).owner for j in jobs] == ["alice", "bob", "alice", "admin"]
        page, token = store.list_jobs(page_size=1, owner="alice")
        assert [j.id for j in page] == [jobs[2].id] and token
        page, token = store.list_jobs(page_size=1, page_token=token, owner="alice")
        assert [j.id for j in page] == [jobs[0].id] and token == ""
        assert len(store.list_jobs()[0]) == 4


def write_version_2_database(path, job_id: str, spec: dict) -> None:
    """A database as version 2 of the schema left it (no users, no owners), with one QUEUED
    job, written with the SQL of that version (today's store would write an owner)."""
    with SqliteStore(path, migrations=MIGRATIONS[:2]) as old:
        assert old.schema_version == 2
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO jobs (id, name, spec, submitted_at, priority, state, max_restarts, "
        "restarts, error, metrics, placement, token_hash) "
        "VALUES (?, ?, ?, 100.0, 0, 'QUEUED', 0, 0, '', '{}', '[]', '')",
        (job_id, spec["name"], json.dumps(spec, sort_keys=True)))
    conn.commit()
    conn.close()


def test_a_version_2_database_gives_its_jobs_to_the_builtin_admin(tmp_path):
    path = tmp_path / "state.db"
    write_version_2_database(path, "j-0123456789ab", {"name": "old", "workers": 1})
    with SqliteStore(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.get_job("j-0123456789ab").owner == BUILTIN_ADMIN
        assert store.list_users() == []  # the server installs the built-in admin at start
        assert [j.id for j in store.list_jobs(owner="admin")[0]] == ["j-0123456789ab"]


# ---------------------------------------------------------------- a running server

def test_an_old_database_and_token_file_keep_working(serve_coordinator, state_dir):
    """A state directory as an older coordinator left it: a version-2 database with a job, and
    a token file ending in a newline. The job is the admin's; the old token is the admin's."""
    state_dir.mkdir(mode=0o700)
    write_version_2_database(state_dir / DB_FILE, "j-0123456789ab",
                             JobSpec.from_dict(SPEC).to_dict())
    (state_dir / "token").write_text("old-admin-token\n")
    (state_dir / "token").chmod(0o600)
    server = serve_coordinator(cluster=Cluster.local(4))
    assert server.token == "old-admin-token"
    with Client(server.address, state_dir=state_dir) as admin:
        assert [(j.id, j.owner) for j in admin.list_jobs()[0]] == [("j-0123456789ab",
                                                                     "admin")]
        user, token = admin.create_user("dave")
    with Client(server.address, token=token) as dave:
        assert dave.list_jobs() == ([], "")  # the old job is not theirs


def test_token_changes_count_at_the_next_call_without_a_restart(serve_coordinator):
    server = serve_coordinator(cluster=Cluster.local(4))
    with Client(server.address, token=server.token) as admin:
        user, first = admin.create_user("erin")
        assert (user.name, user.admin, user.active) == ("erin", False, True)
        with Client(server.address, token=first) as erin:
            job = erin.submit_job(SPEC)
            assert job.owner == "erin" and erin.get_job(job.id).owner == "erin"
            _, second = admin.issue_token("erin")
            with pytest.raises(ClientError) as info:
                erin.get_job(job.id)
            assert info.value.code == "UNAUTHENTICATED"
        with Client(server.address, token=second) as erin:
            assert [j.id for j in erin.list_jobs()[0]] == [job.id]
            assert admin.revoke_user("erin").active is False
            with pytest.raises(ClientError) as info:
                erin.list_jobs()
            assert info.value.code == "UNAUTHENTICATED"
        assert [(u.name, u.active) for u in admin.list_users()] == [("admin", True),
                                                                   ("erin", False)]
        _, third = admin.issue_token("erin")  # active again, with a new token
        with Client(server.address, token=third) as erin:
            assert erin.cancel_job(job.id).owner == "erin"
        assert admin.get_job(job.id).state.value == "CANCELLED"


def test_users_see_their_own_jobs_and_admins_every_job(serve_coordinator):
    server = serve_coordinator(cluster=Cluster.local(4))
    with Client(server.address, token=server.token) as admin:
        tokens = {name: admin.create_user(name, admin=name == "root2")[1]
                  for name in ("fay", "gus", "root2")}
        mine = admin.submit_job(SPEC)
        submitted = {}
        for name in ("fay", "gus", "root2"):
            with Client(server.address, token=tokens[name]) as client:
                submitted[name] = client.submit_job(SPEC).id
        for name in ("fay", "gus"):
            with Client(server.address, token=tokens[name]) as client:
                assert [j.id for j in client.iter_jobs()] == [submitted[name]]
                assert [j.id for j in client.iter_jobs(owner=name)] == [submitted[name]]
        with Client(server.address, token=tokens["root2"]) as root2:  # another admin
            assert {j.id for j in root2.iter_jobs()} == {mine.id, *submitted.values()}
            assert [j.id for j in root2.iter_jobs(owner="gus")] == [submitted["gus"]]
            assert root2.get_job(submitted["fay"]).owner == "fay"


def test_the_builtin_admin_is_changed_by_its_token_file_only(serve_coordinator, state_dir):
    server = serve_coordinator(cluster=Cluster.local(4))
    with Client(server.address, token=server.token) as admin:
        for call in (admin.issue_token, admin.revoke_user):
            with pytest.raises(ClientError) as info:
                call("admin")
            assert info.value.code == "FAILED_PRECONDITION"
            assert "STATE_DIR/token: replace that file and restart" in info.value.details
    server.stop(grace=0)
    old = server.token
    write_token_file(state_dir / "token", "a-new-admin-token")  # rotated: the file, a restart
    server = serve_coordinator(cluster=Cluster.local(4), port=server.port)
    with Client(server.address, token="a-new-admin-token") as admin:
        assert [u.name for u in admin.list_users()] == ["admin"]
    with Client(server.address, token=old) as stale, pytest.raises(ClientError) as info:
        stale.list_users()
    assert info.value.code == "UNAUTHENTICATED"


def test_user_rpcs_refuse_bad_names_and_unknown_users(serve_coordinator):
    server = serve_coordinator(cluster=Cluster.local(4))
    with Client(server.address, token=server.token) as admin:
        with pytest.raises(ClientError) as info:
            admin.create_user("Bad Name")
        assert str(info.value) == ("INVALID_ARGUMENT: name: must be 1-64 of a-z 0-9 . _ -, "
                                   "starting with a letter, got 'Bad Name'")
        admin.create_user("hal")
        with pytest.raises(ClientError) as info:
            admin.create_user("hal")
        assert info.value.code == "ALREADY_EXISTS"
        for call in (admin.issue_token, admin.revoke_user):
            with pytest.raises(ClientError) as info:
                call("nobody")
            assert info.value.code == "NOT_FOUND"


# ---------------------------------------------------------------- token files

def test_the_first_start_writes_the_token_without_a_newline(serve_coordinator, state_dir):
    server = serve_coordinator(cluster=Cluster.local(4))
    raw = (state_dir / "token").read_bytes()
    assert raw == server.token.encode() and len(raw) == 43  # 32 bytes, URL-safe base64
    assert stat.S_IMODE((state_dir / "token").stat().st_mode) == 0o600


@pytest.mark.parametrize("written", ["{}", "{}\n", "{}\r\n", "  {}  \n", "\t{}\r\n\r\n"])
def test_token_files_are_read_with_whitespace_stripped(serve_coordinator, tmp_path, written):
    server = serve_coordinator(cluster=Cluster.local(4))
    path = tmp_path / "admin.token"
    path.write_bytes(written.format(server.token).encode())
    assert read_token_file(path) == server.token
    with Client(server.address, token_file=path) as client:
        assert client.list_users()[0].name == "admin"
    with Client(server.address, token=written.format(server.token)) as client:
        assert client.list_users()[0].name == "admin"  # the token itself, given with spaces


def test_write_token_file_writes_the_token_alone_and_privately(tmp_path):
    path = tmp_path / "t"
    write_token_file(path, "abc\n")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_find_token_says_where_the_token_came_from(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "token").write_text("from-state\n")
    (tmp_path / "f").write_text("from-file")
    environ = {"DPTRAIN_TOKEN": " from-env\n", "DPTRAIN_TOKEN_FILE": str(tmp_path / "f")}
    assert find_token("given", state_dir=tmp_path / "state", environ=environ) == (
        "given", "the token given to the client")
    assert find_token(token_file=tmp_path / "f", environ=environ) == (
        "from-file", f"the token file {tmp_path / 'f'}")
    assert find_token(state_dir=tmp_path / "state", environ=environ) == (
        "from-env", "$DPTRAIN_TOKEN")
    assert find_token(state_dir=tmp_path / "state",
                      environ={"DPTRAIN_TOKEN_FILE": str(tmp_path / "f")}) == (
        "from-file", f"the token file {tmp_path / 'f'} ($DPTRAIN_TOKEN_FILE)")
    assert find_token(state_dir=tmp_path / "state", environ={}) == (
        "from-state", f"the token file {tmp_path / 'state' / 'token'}")
    assert find_token(state_dir=tmp_path / "none", environ={}) == (
        None, f"no token (none given, no $DPTRAIN_TOKEN or $DPTRAIN_TOKEN_FILE, nor "
              f"{tmp_path / 'none' / 'token'})")


def test_install_builtin_admin_creates_it_once(tmp_path):
    with SqliteStore(tmp_path / "state.db") as store:
        first = users.install_builtin_admin(store, "t1", now=5.0)
        assert (first.name, first.admin, first.created_at) == ("admin", True, 5.0)
        again = users.install_builtin_admin(store, "t2", now=9.0)
        assert again.created_at == 5.0 and store.user_by_token_hash(_sha256("t2")) == again
        assert store.user_by_token_hash(_sha256("t1")) is None
        assert sqlite3.connect(tmp_path / "state.db").execute(
            "SELECT COUNT(*) FROM users").fetchone() == (1,)
