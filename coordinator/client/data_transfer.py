"""The client's end of the coordinator's data port (``server.data_port``; the protocol is
``api.data_wire``): connect with a ticket a gRPC call handed out, then receive a download's
bytes or a fetch's files, or send an upload's files.

`Client` uses it by default and falls back to the gRPC streams, for the rest of its life,
when the port is off, refused or unreachable within `CONNECT_TIMEOUT_S` (`DataPortUnreachable`):
a firewall that lets gRPC through but not the port next to it costs one short wait, once.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from dptrain.coordinator.api.data_wire import (
    TICKET_BYTES,
    DataWireError,
    read_status,
    receive,
    receive_files,
    send_file,
)
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.client.errors import ClientError
from dptrain.worker.checkpoint_manifest import FileEntry

__all__ = ["CONNECT_TIMEOUT_S", "DataPortUnreachable", "connect", "DataDownload",
           "fetched_files", "send_upload", "tls_context"]

CONNECT_TIMEOUT_S = 3.0
"""How long a client waits for the data port to accept before it uses the gRPC streams."""

READ_TIMEOUT_S = 120.0
"""How long a transfer waits for the server between two reads (the server's own limit)."""

_T = TypeVar("_T")

_SEND_BYTES = 8 * CHUNK_BYTES  # per sendfile call: progress is reported between calls


class DataPortUnreachable(Exception):
    """The data port did not accept the connection (or its TLS handshake failed)."""


def tls_context(ca_pem: bytes) -> ssl.SSLContext:
    """The context that verifies the data port with the CA certificate(s) gRPC is given."""
    return ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))


def connect(host: str, port: int, ticket: bytes, tls: ssl.SSLContext | None,
            timeout: float = READ_TIMEOUT_S) -> socket.socket:
    """A data connection whose ticket the server accepted.

    Args:
        host: the host the gRPC channel reaches.
        port: the data port (``DataTicket.port``).
        ticket: ``DataTicket.ticket``.
        tls: verify and encrypt with this context; None: plain TCP.
        timeout: seconds each read or write may wait.

    Raises:
        DataPortUnreachable: no connection within `CONNECT_TIMEOUT_S` (or TLS failed).
        ClientError: the server refused the ticket (its code: ABORTED for a used or expired
            ticket, UNAVAILABLE when it is busy), or the connection broke (UNAVAILABLE).
    """
    if len(ticket) != TICKET_BYTES:
        raise ClientError("INTERNAL", f"the data ticket has {len(ticket)} bytes, not "
                          f"{TICKET_BYTES}")
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise DataPortUnreachable(f"{host}:{port}: {e}") from None
    try:
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as e:
                raise DataPortUnreachable(f"{host}:{port}: TLS: {e}") from None
        sock.settimeout(timeout)
        try:
            sock.sendall(ticket)
            code, message, _ = read_status(sock)
        except OSError as e:
            raise ClientError("UNAVAILABLE", f"the data port {host}:{port} broke off: {e}"
                              ) from None
        if code != "OK":
            raise ClientError(code, f"the data port {host}:{port} refused the transfer: "
                              f"{message}")
    except BaseException:
        sock.close()
        raise
    return sock


class DataDownload:
    """The bytes of a download from an accepted data connection, as the chunks of a stream
    (iterate once); `cancel` ends it from any thread.

    Args:
        sock: the connection (`connect`); closed when the bytes end or break.
        length: the bytes to expect.
    """

    def __init__(self, sock: socket.socket, length: int):
        self._sock, self._length = sock, length

    def __iter__(self) -> Iterator[bytes]:
        return _closing(self._sock, receive(self._sock, self._length))

    def cancel(self) -> None:
        """Break the connection (a reader blocked in it gets UNAVAILABLE) and close it."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def fetched_files(sock: socket.socket, files: tuple[FileEntry, ...]
                  ) -> Iterator[tuple[str, bytes]]:
    """A fetch's files from an accepted data connection, as the FetchCheckpoint stream's
    ``(name, chunk)`` pairs; the connection is closed when they end or break.

    Raises:
        ClientError: UNAVAILABLE when the connection broke.
    """
    return _closing(sock, receive_files(sock, files))


def _closing(sock: socket.socket, items: Iterator[_T]) -> Iterator[_T]:
    """`items` read from `sock`, which is closed when they end or break; a broken connection
    raises ClientError UNAVAILABLE, as a broken stream does."""
    try:
        yield from items
    except OSError as e:  # closed, reset or silent: DataWireError among them
        raise ClientError("UNAVAILABLE", f"the data connection broke off: {e}") from None
    finally:
        sock.close()


def send_upload(sock: socket.socket, directory: Path, files: tuple[FileEntry, ...],
                on_chunk: Callable[[int], None] | None = None) -> bytes:
    """Send each file's bytes in the header's order and read the server's answer.

    Args:
        sock: an accepted upload connection (`connect`); left open.
        directory: the checkpoint directory.
        files: the header's files.
        on_chunk: called with the size of each piece sent.

    Returns:
        The serialized ``Checkpoint`` the server stored.

    Raises:
        ClientError: DATA_LOSS when a file's size is not its manifest's (nothing is sent
            after it, so nothing is stored), the server's code when it refused the upload
            (as UploadCheckpoint would have ended), UNAVAILABLE when the connection broke.
        OSError: a file cannot be read.
    """
    try:
        for entry in files:
            with open(directory / entry.name, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.size:
                    raise ClientError("DATA_LOSS", f"{entry.name}: {size} bytes on disk, its "
                                      f"manifest says {entry.size}: the checkpoint changed "
                                      f"after it was written")
                offset = 0
                while offset < size:
                    sent = send_file(sock, f, offset, min(_SEND_BYTES, size - offset))
                    if not sent:
                        raise ClientError("DATA_LOSS", f"{entry.name} shrank while it was "
                                          f"sent")
                    offset += sent
                    if on_chunk is not None:
                        on_chunk(sent)
        code, message, body = read_status(sock)
    except (ConnectionError, TimeoutError, DataWireError) as e:
        raise ClientError("UNAVAILABLE", f"the data connection broke off: {e}") from None
    if code != "OK":
        raise ClientError(code, message)
    return body
