"""What the user RPCs do, as plain functions of ``(request, state)``: no grpc here.

A user holds one valid token at a time; the store keeps only its hash (`api.records.hash_token`)
and the server looks it up at every call, so creating, reissuing or revoking a token takes
effect at the next call, without a restart. Who may call these (admins) is `server.access`'s.

The built-in admin (`api.records.BUILTIN_ADMIN`) is the server's own: its token is the file
``STATE_DIR/token``, installed at every start (`install_builtin_admin`), so it is changed by
replacing that file and restarting, never over the API (a revoked file token would come back
at the next start).
"""

from __future__ import annotations

import time

from dptrain.coordinator.api.errors import CoordinatorError, UserNotFound
from dptrain.coordinator.api.records import (
    BUILTIN_ADMIN,
    User,
    check_user_name,
    hash_token,
    new_token,
)
from dptrain.coordinator.server.store import Store

__all__ = ["BuiltinAdmin", "install_builtin_admin", "create_user", "issue_token",
           "revoke_user", "list_users"]


class BuiltinAdmin(CoordinatorError):
    """The built-in admin's token is changed on the server's machine, not over the API
    (FAILED_PRECONDITION)."""

    status = "FAILED_PRECONDITION"

    def __init__(self) -> None:
        super().__init__(f"name: user {BUILTIN_ADMIN!r} is the built-in admin, whose "
                         f"token is the server's STATE_DIR/token: replace that file and "
                         f"restart the server to change it (or create another admin: "
                         f"dptrain user add NAME --admin)")


def install_builtin_admin(store: Store, token: str, *, now: float | None = None) -> User:
    """Make `token` the built-in admin's (created on the first start, and in a database from
    before users, whose jobs already belong to it).

    Args:
        store: the server's store.
        token: the admin token (``STATE_DIR/token`` or the server's settings).
        now: the creation time, if it is created.

    Returns:
        The built-in admin.
    """
    try:
        return store.set_user_token(BUILTIN_ADMIN, hash_token(token))
    except UserNotFound:
        return store.create_user(User(BUILTIN_ADMIN, True, time.time() if now is None else now,
                                      hash_token(token)))


def create_user(name: str, admin: bool, store: Store, *,
                now: float | None = None) -> tuple[User, str]:
    """Create a user with a first token.

    Args:
        name: its name (`check_user_name`).
        admin: make it an admin.
        store: the server's store.
        now: its creation time (default: the clock).

    Returns:
        The user and its token (the only copy: the store keeps the hash).

    Raises:
        ValidationError: a bad name.
        AlreadyExists: the name is taken.
    """
    token = new_token()
    user = User(check_user_name(name), bool(admin), time.time() if now is None else now,
                hash_token(token))
    return store.create_user(user), token


def issue_token(name: str, store: Store) -> tuple[User, str]:
    """A new token for a user, replacing its previous one (a revoked user is active again).

    Returns:
        The user and its new token.

    Raises:
        UserNotFound: no such user.
        BuiltinAdmin: the built-in admin.
    """
    _not_builtin(name)
    token = new_token()
    return store.set_user_token(name, hash_token(token)), token


def revoke_user(name: str, store: Store) -> User:
    """Revoke a user's token; the user and its jobs stay (`issue_token` reactivates it).

    Raises:
        UserNotFound: no such user.
        BuiltinAdmin: the built-in admin.
    """
    _not_builtin(name)
    return store.set_user_token(name, "")


def list_users(store: Store) -> list[User]:
    """Every user, by name."""
    return store.list_users()


def _not_builtin(name: str) -> None:
    if name == BUILTIN_ADMIN:
        raise BuiltinAdmin()
