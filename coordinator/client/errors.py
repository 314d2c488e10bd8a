"""`ClientError`: how every failed call of the Python client reads (``client.client``)."""

from __future__ import annotations

__all__ = ["ClientError"]


class ClientError(Exception):
    """A failed call: ``code`` is the gRPC status code's name, ``details`` the server's message.

    ``str(error)`` is one line: ``"CODE: details"``.

    Args:
        code: e.g. ``"NOT_FOUND"``.
        details: what went wrong.
    """

    def __init__(self, code: str, details: str):
        self.code, self.details = code, " ".join(str(details).split())
        super().__init__(f"{code}: {self.details}")
