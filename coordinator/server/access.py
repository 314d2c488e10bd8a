"""Who may call what: the one table of rules (RPC -> `Rule`) and the callers it applies to.

Three kinds of token, one kind of caller each:

* A **user's token** (``dptrain user add`` / ``dptrain user token``; the built-in admin's is the
  server's ``STATE_DIR/token``). The store keeps only its hash, and it is looked up at every
  call, so a new or revoked token takes effect at the next one, without a restart. A user acts
  on its own jobs; an **admin** on every job, and on users.
* A **worker token**, made for one launch of one job (the store keeps its hash beside the
  job), sent with ``dptrain-job-id: <job id>``: it may call ``WorkerService`` for that job and
  nothing else, and dies with its attempt (`server.jobs`).
* No token: only the standard health service.

`RULES` names the rule of every RPC of the dptrain services; an RPC without a row is refused
(PERMISSION_DENIED), and a test fails when the service descriptor has an RPC the table lacks,
so a new RPC is one new row here. The rules needing the job (its owner, its workers) are
applied once the request names it: `Principal.require_owner`, `Principal.require_job`.

No grpc here: `server.auth` applies `authenticate` to every call in an interceptor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dptrain.coordinator.api.credentials import AUTHORIZATION, JOB_ID_HEADER
from dptrain.coordinator.api.errors import PermissionDenied, Unauthenticated
from dptrain.coordinator.api.records import Job, User, hash_token, verify_token

__all__ = ["Rule", "RULES", "HEALTH_SERVICE", "DPTRAIN_PACKAGE", "Principal", "rule_of",
           "authenticate"]

HEALTH_SERVICE = "/grpc.health.v1.Health/"
DPTRAIN_PACKAGE = "/dptrain.v1."


class Rule(Enum):
    """Who may call an RPC; the value is how error messages state the rule."""

    SIGNED_IN = "any user"
    OWNER_OR_ADMIN = "the job's owner or an admin"
    ADMIN = "admins only"
    JOB_WORKER = "the job's workers (or an admin)"


_C, _W = "dptrain.v1.Coordinator/", "dptrain.v1.WorkerService/"

#: The rule of every RPC, by ``service/method``. Add a row with each new RPC.
RULES: Mapping[str, Rule] = {
    _C + "SubmitJob": Rule.SIGNED_IN,
    _C + "ListJobs": Rule.SIGNED_IN,  # a user's listing holds only its own jobs
    _C + "UploadCode": Rule.SIGNED_IN,
    _C + "GetJob": Rule.OWNER_OR_ADMIN,
    _C + "CancelJob": Rule.OWNER_OR_ADMIN,
    _C + "WatchJob": Rule.OWNER_OR_ADMIN,
    _C + "ListCheckpoints": Rule.OWNER_OR_ADMIN,
    _C + "DownloadCheckpoint": Rule.OWNER_OR_ADMIN,
    _C + "DeleteJob": Rule.OWNER_OR_ADMIN,
    _C + "KeepCheckpoint": Rule.OWNER_OR_ADMIN,
    _C + "CreateUser": Rule.ADMIN,
    _C + "IssueToken": Rule.ADMIN,
    _C + "RevokeUser": Rule.ADMIN,
    _C + "ListUsers": Rule.ADMIN,
    _W + "ReportProgress": Rule.JOB_WORKER,
    _W + "Heartbeat": Rule.JOB_WORKER,
    _W + "UploadCheckpoint": Rule.JOB_WORKER,
    _W + "OpenCheckpointUpload": Rule.JOB_WORKER,  # the upload over the data port
    _W + "FetchCheckpoint": Rule.JOB_WORKER,
    _W + "FetchCode": Rule.JOB_WORKER,
}


def rule_of(method: str) -> Rule | None:
    """The rule of a full method name (``/dptrain.v1.Coordinator/GetJob``).

    Returns:
        Its row in `RULES`; `Rule.SIGNED_IN` for the standard services beside ours (server
        reflection); None for a dptrain RPC without a row (refused).
    """
    rule = RULES.get(method.lstrip("/"))
    if rule is None and not method.startswith(DPTRAIN_PACKAGE):
        return Rule.SIGNED_IN
    return rule


@dataclass(frozen=True)
class Principal:
    """Who is calling.

    Attributes:
        user: the user's name, for a user's token; None for a worker token or a health check.
        admin: the user is an admin.
        job_id: for a worker token, the job it belongs to.
    """

    user: str | None = None
    admin: bool = False
    job_id: str | None = None

    def require_job(self, job_id: str) -> None:
        """Allow a worker RPC on `job_id`: admins on any job, a worker token on its own.

        Raises:
            PermissionDenied: a worker token of another job.
        """
        if not self.admin and self.job_id != job_id:
            raise PermissionDenied(f"this worker token belongs to job {self.job_id!r}, "
                                   f"not {job_id!r}")

    def require_owner(self, job: Job) -> None:
        """Allow acting on `job`: its owner or an admin.

        Raises:
            PermissionDenied: naming the job's owner and the rule.
        """
        if not self.admin and job.owner != self.user:
            raise PermissionDenied(f"job {job.id!r} belongs to user {job.owner!r}: a user may "
                                   f"act only on their own jobs (admins on every job)")

    def list_owner(self, owner: str) -> str | None:
        """Whose jobs a listing asking for `owner` ("" for all) may show.

        Returns:
            An admin: `owner`, or None for everyone's; a user: itself.

        Raises:
            PermissionDenied: a user asking for another user's jobs.
        """
        if self.admin:
            return owner or None
        if owner and owner != self.user:
            raise PermissionDenied(f"owner: user {self.user!r} may list only their own jobs "
                                   f"(admins every user's), got {owner!r}")
        return self.user


def _bearer(metadata: Iterable[tuple[str, Any]]) -> tuple[str, str]:
    """The call's bearer token (stripped: some clients send a token file's newline) and the
    job id it claims, or Unauthenticated."""
    values: dict[str, Any] = {}
    for key, value in metadata:
        values.setdefault(key.lower(), value)
    scheme, _, token = str(values.get(AUTHORIZATION, "")).partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("missing bearer token: send the metadata 'authorization: "
                              "Bearer <token>' (a user's token: dptrain user token NAME; the "
                              "built-in admin's is in the server's STATE_DIR/token)")
    return token, str(values.get(JOB_ID_HEADER, ""))


def authenticate(metadata: Iterable[tuple[str, Any]], method: str,
                 user_of: Callable[[str], User | None],
                 job_token_hash: Callable[[str], str | None]) -> Principal:
    """Decide who is calling `method`, or refuse; the job-dependent rules come later
    (`Principal.require_owner`, `Principal.require_job`).

    Args:
        metadata: the call's metadata pairs.
        method: the full method name, e.g. ``/dptrain.v1.Coordinator/GetJob``.
        user_of: token hash -> the user holding that token now, or None.
        job_token_hash: job id -> its stored worker token hash (None: no such job).

    Returns:
        The caller (health checks pass as an anonymous `Principal`).

    Raises:
        Unauthenticated: no token, or one that no user and not the named job holds.
        PermissionDenied: a token outside its rule (the message names the rule).
    """
    if method.startswith(HEALTH_SERVICE):
        return Principal()
    token, job_id = _bearer(metadata)
    name = method.lstrip("/")
    rule = rule_of(method)
    user = user_of(hash_token(token))
    if user is not None:
        if rule is None:
            raise PermissionDenied(f"{name} has no access rule: it is refused to everyone")
        if rule is Rule.ADMIN and not user.admin:
            raise PermissionDenied(f"{name} is for {rule.value}; user {user.name!r} is not "
                                   f"an admin")
        if rule is Rule.JOB_WORKER and not user.admin:
            raise PermissionDenied(f"{name} is for {rule.value}: a user's token may not call "
                                   f"it")
        return Principal(user=user.name, admin=user.admin)
    token_hash = job_token_hash(job_id) if job_id else None
    if not token_hash or not verify_token(token, token_hash):
        if not job_id:
            raise Unauthenticated("invalid token: no user holds it (unknown, revoked, or "
                                  "replaced by a newer one: dptrain user token NAME)")
        raise Unauthenticated(f"invalid token: neither a user's token nor the current worker "
                              f"token of job {job_id!r} (named in 'dptrain-job-id'; every "
                              f"launch of a job replaces its workers' token)")
    if rule is not Rule.JOB_WORKER:
        raise PermissionDenied(f"a worker token may call only dptrain.v1.WorkerService, not "
                               f"{name}")
    return Principal(job_id=job_id)
