"""The coordinator's data port on the wire: what both ends of a checkpoint transfer beside gRPC
say to each other (``DataTicket`` in ``protos/dptrain/v1/coordinator.proto``).

One gRPC stream moves a checkpoint at most at the rate its framing and its receiving thread
allow, about 0.7x a plain copy of the file (docs/benchmarks.md, "Checkpoint transfer"); a
plain TCP connection moves it with ``sendfile`` on one end and ``recv`` into the hasher on the
other. So a gRPC call does everything but move the bytes (the caller's token and access rule,
the checks of the request) and hands out a ticket, and the bytes go over the data port::

    client                                   server
    32 ticket bytes                   ->
                                      <-     "OK 0 \\n"   (or "ABORTED 0 <why>\\n", closed)
    download:                         <-     the bytes asked for, then closed
    fetch:                            <-     every file's bytes in the header's order, closed
    upload:   every file's bytes      ->
                                      <-     "OK <n> \\n" + n bytes of a serialized Checkpoint
                                             (or "DATA_LOSS 0 <why>\\n", ...)

Every answer of the server is one status line, ``CODE LENGTH MESSAGE\\n`` (CODE a gRPC status
code's name, MESSAGE one line), followed by LENGTH bytes: readable by a person with ``nc``, and
parsed here alike by both ends.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

from dptrain.coordinator.api.limits import CHUNK_BYTES

if TYPE_CHECKING:
    from dptrain.worker.checkpoint_manifest import FileEntry

_TLS_RECORD = 16384  # the most a TLS record carries, so the most one recv returns

__all__ = ["TICKET_BYTES", "MAX_STATUS_LINE", "encode_status", "read_status", "recv_exactly",
           "send_file", "receive", "receive_files", "DataWireError"]

TICKET_BYTES = 32
"""A ticket's length: ``secrets.token_bytes(32)``."""

MAX_STATUS_LINE = 4096
"""The longest status line either end reads (a message is cut well before)."""


class DataWireError(ConnectionError):
    """The peer broke the protocol: closed early, or sent something that is not a status."""


def encode_status(code: str, message: str = "", body: bytes = b"") -> bytes:
    """One answer of the server: its status line, then `body`.

    Args:
        code: a gRPC status code's name (``OK``, ``DATA_LOSS`` ...).
        message: what went wrong, one line (newlines are replaced).
        body: the bytes that follow the line.
    """
    line = " ".join(message.split())
    return f"{code} {len(body)} {line}".encode()[:MAX_STATUS_LINE - 1] + b"\n" + body


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from `sock`.

    Raises:
        DataWireError: the connection closed before.
        OSError: the socket failed or timed out.
    """
    parts, got = [], 0
    while got < size:
        part = sock.recv(size - got)
        if not part:
            raise DataWireError(f"the connection closed after {got} of {size} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_status(sock: socket.socket) -> tuple[str, str, bytes]:
    """Read one answer of the server (`encode_status`).

    Returns:
        ``(code, message, body)``.

    Raises:
        DataWireError: the connection closed, or the line is not a status.
        OSError: the socket failed or timed out.
    """
    line = bytearray()
    while not line.endswith(b"\n"):  # byte by byte: what follows the line is not ours
        if len(line) >= MAX_STATUS_LINE:
            raise DataWireError("the data port's status line is too long")
        byte = sock.recv(1)
        if not byte:
            raise DataWireError("the data port closed the connection without an answer")
        line += byte
    code, size, message = (line.decode("utf-8", "replace").rstrip("\n").split(" ", 2)
                           + ["", ""])[:3]
    if not code.isupper() or not size.isdigit():
        raise DataWireError(f"the data port answered {bytes(line[:80])!r}, not a status line")
    return code, message, recv_exactly(sock, int(size)) if int(size) else b""


def send_file(sock: socket.socket, f: BinaryIO, offset: int, count: int) -> int:
    """Send up to `count` bytes of the open file `f` from `offset`: with ``sendfile`` (the
    kernel copies them, no Python buffer), or read and sent 1 MiB at a time over TLS.

    Returns:
        The bytes sent (0: the file ended).

    Raises:
        OSError: the socket or the file failed.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return sock.sendfile(f, offset, count)
    # socket.sendfile's own fallback for an SSL socket would send 8 KiB at a time.
    data = os.pread(f.fileno(), min(count, CHUNK_BYTES), offset)
    sock.sendall(data)
    return len(data)


def receive(sock: socket.socket, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes from `sock`, as chunks of at most `CHUNK_BYTES`.

    A plain socket's ``recv`` returns what the kernel has, up to a chunk; a TLS socket's returns
    one record (16 KiB at most), so its records are gathered into chunks first: each chunk
    costs its receiver a hasher update and a hand-off to the writer thread.

    Raises:
        DataWireError: the connection closed before `size` bytes (the chunks before it were
            yielded).
        OSError: the socket failed or timed out.
    """
    left = size
    tls = isinstance(sock, ssl.SSLSocket)
    while left > 0:
        want = min(CHUNK_BYTES, left)
        if tls:  # asked for more, ssl allocates all of it for each record, then shrinks it
            parts, got = [], 0
            while got < want and (more := sock.recv(min(_TLS_RECORD, want - got))):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        else:
            data = sock.recv(want)
        if not data:
            raise DataWireError(f"the connection closed with {left} of {size} bytes to go")
        left -= len(data)
        yield data


def receive_files(sock: socket.socket, files: Iterable[FileEntry]) -> Iterator[tuple[str, bytes]]:
    """Each file's bytes in turn (``file.size`` of them), as ``(name, chunk)``: what an upload's
    receiver (the server) and a fetch's (the worker) read, the stream's chunks alike.

    Raises:
        DataWireError: the connection closed before the last file's last byte.
        OSError: the socket failed or timed out.
    """
    for f in files:
        for data in receive(sock, f.size):
            yield f.name, data
