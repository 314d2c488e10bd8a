"""What a client sends to prove who it is: finding its token, and the call metadata that
carries a token. Client and server share these names; checking a token is the server's
(`dptrain.coordinator.server.access`, which also says who may call what).

Token files hold the token alone: written without a trailing newline (grpc-js, for one, refuses
a header value ``Bearer ...\n``), read with surrounding whitespace stripped (so a file written
by hand, or by an older version, with ``\n``, ``\r\n`` or spaces keeps working).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dptrain.atomic_files import write_atomically

__all__ = [
    "TOKEN_FILE", "TOKEN_ENV", "TOKEN_FILE_ENV", "AUTHORIZATION", "JOB_ID_HEADER",
    "read_token_file", "write_token_file", "find_token", "bearer_metadata",
]

TOKEN_FILE = "token"
TOKEN_ENV = "DPTRAIN_TOKEN"
TOKEN_FILE_ENV = "DPTRAIN_TOKEN_FILE"
AUTHORIZATION = "authorization"
JOB_ID_HEADER = "dptrain-job-id"


def read_token_file(path: str | os.PathLike) -> str:
    """The token stored in a file (surrounding whitespace ignored).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is empty.
    """
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {os.fspath(path)} is empty")
    return token


def write_token_file(path: str | os.PathLike, token: str) -> None:
    """Write a token file as every client can read it: the token alone, no trailing newline,
    mode 0600, atomically (`dptrain.atomic_files`).

    Args:
        path: the file.
        token: the token.
    """
    write_atomically(path, [token.strip().encode()], mode=0o600)


def find_token(token: str | None = None, *, token_file: str | os.PathLike | None = None,
               state_dir: str | os.PathLike | None = None,
               environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """Find the token a client should send, first match wins, and say where it came from.

    Order: `token`; `token_file`; ``$DPTRAIN_TOKEN``; the file ``$DPTRAIN_TOKEN_FILE``;
    ``state_dir/token`` when it exists.

    Args:
        token: given directly.
        token_file: a file holding it.
        state_dir: a coordinator's state directory on this machine.
        environ: the environment (default: ``os.environ``).

    Returns:
        ``(token, source)``: the token (None when none was found) and where it was read, for
        messages, e.g. ``"the token file /home/me/.local/state/dptrain/token"``.

    Raises:
        OSError, ValueError: a named token file cannot be read or is empty.
    """
    environ = os.environ if environ is None else environ
    if token:
        return token.strip(), "the token given to the client"
    if token_file is not None:
        return read_token_file(token_file), f"the token file {os.fspath(token_file)}"
    if environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if environ.get(TOKEN_FILE_ENV):
        path = environ[TOKEN_FILE_ENV]
        return read_token_file(path), f"the token file {path} (${TOKEN_FILE_ENV})"
    if state_dir is not None and (Path(state_dir) / TOKEN_FILE).is_file():
        path = Path(state_dir) / TOKEN_FILE
        return read_token_file(path), f"the token file {path}"
    where = "" if state_dir is None else f", nor {Path(state_dir) / TOKEN_FILE}"
    return None, f"no token (none given, no ${TOKEN_ENV} or ${TOKEN_FILE_ENV}{where})"


def bearer_metadata(token: str | None, job_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a token (and, for a worker token, its job).

    Args:
        token: the token; None sends none.
        job_id: the job a worker token belongs to.

    Returns:
        Metadata pairs for ``stub.Method(request, metadata=...)``.
    """
    metadata = []
    if token:
        metadata.append((AUTHORIZATION, f"Bearer {token}"))
    if job_id:
        metadata.append((JOB_ID_HEADER, job_id))
    return tuple(metadata)
