"""The data port: checkpoint bytes over plain TCP beside gRPC, as object stores hand out
pre-signed URLs.

A gRPC call (DownloadCheckpoint or FetchCheckpoint with ``data_port``, or OpenCheckpointUpload)
does everything
but move the bytes: the caller's token and access rule (`server.access`), the request's checks,
the choice of file; then it issues a `Tickets` entry instead of streaming. The client connects
here, sends the ticket, and the bytes flow without gRPC's framing (``api.data_wire`` has the
protocol): a download is ``sendfile``d from its blob file, a fetch from each file's blob in
turn; an upload's bytes go to the same
`checkpoint_store.receive_checkpoint` as UploadCheckpoint's chunks (verified blobs, the record
only once all are stored, retention, metrics), and the status that stream would have ended with
comes back on the socket. With TLS the connection is wrapped with the gRPC server's certificate
(``ssl``: no ``sendfile`` then).

A ticket is 32 random bytes, good once and for `TICKET_LIFETIME_S`, kept in memory only: a
restarted server has forgotten them, and its clients ask again through gRPC. A connection must
present its ticket within `HANDSHAKE_TIMEOUT_S` or is closed; a bad, used or expired ticket
gets a status line (ABORTED: ask again) and the connection is closed; at most
``max_connections`` transfers run at once (the next gets UNAVAILABLE). Nothing a connection
sends can disturb the server: each runs on its own thread and every error ends only it.
Each connection is counted by how it ended, and its bytes by direction (``server.metrics``).
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dptrain.coordinator.api import serde
from dptrain.coordinator.api.checkpoint_upload import CheckpointUpload
from dptrain.coordinator.api.data_wire import (
    TICKET_BYTES,
    encode_status,
    receive_files,
    recv_exactly,
    send_file,
)
from dptrain.coordinator.api.limits import CHUNK_BYTES
from dptrain.coordinator.server import checkpoint_store as checkpoints
from dptrain.coordinator.server.blobs import BlobLease
from dptrain.coordinator.server.checkpoint_store import DownloadPlace, FetchPlace
from dptrain.coordinator.server.service import answer_of

if TYPE_CHECKING:
    from dptrain.coordinator.server.jobs import ServiceState

__all__ = ["DataPort", "Tickets", "TICKET_LIFETIME_S", "HANDSHAKE_TIMEOUT_S",
           "MAX_CONNECTIONS"]

log = logging.getLogger("dptrain.coordinator")

TICKET_LIFETIME_S = 60.0
"""How long a ticket waits for its connection."""

HANDSHAKE_TIMEOUT_S = 5.0
"""How long a connection may take to present its ticket (and finish its TLS handshake)."""

IO_TIMEOUT_S = 120.0
"""How long a transfer may wait for its peer between two reads or writes."""

MAX_CONNECTIONS = 64
"""Data connections served at once."""

_SEND_BYTES = 8 * CHUNK_BYTES  # one sendfile call: the metrics count as the bytes go


class _PeerGone(Exception):
    """The uploading side went away (closed, reset or silent) before its last byte."""


@dataclass(frozen=True)
class _Upload:
    upload: CheckpointUpload


_Grant = DownloadPlace | FetchPlace | _Upload


class Tickets:
    """Single-use tickets, each for one download (`DownloadPlace`, its blob leased), one fetch
    (`FetchPlace`, its blobs leased) or one upload, forgotten `lifetime` seconds after issue.

    Args:
        lifetime: seconds a ticket stays good.
    """

    def __init__(self, lifetime: float = TICKET_LIFETIME_S):
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._grants: dict[bytes, tuple[float, _Grant]] = {}

    def issue(self, grant: _Grant) -> bytes:
        """A new ticket for `grant` (a lease is released when the ticket dies unused)."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._sweep(time.monotonic())
            self._grants[ticket] = (time.monotonic() + self.lifetime, grant)
        return ticket

    def redeem(self, ticket: bytes) -> _Grant | None:
        """The grant of a good ticket, which is used up; None for an unknown, used or expired
        one."""
        with self._lock:
            self._sweep(time.monotonic())  # an expired ticket is gone before it is looked up
            return self._grants.pop(ticket, (0.0, None))[1]

    def _sweep(self, now: float) -> None:
        for ticket, (deadline, grant) in list(self._grants.items()):
            if deadline <= now:
                del self._grants[ticket]
                _release(grant)

    def close(self) -> None:
        """Forget every ticket."""
        with self._lock:
            grants, self._grants = list(self._grants.values()), {}
        for _, grant in grants:
            _release(grant)


def _release(grant: _Grant | None) -> None:
    if isinstance(grant, (DownloadPlace, FetchPlace)):
        grant.lease.release()


class DataPort:
    """The data listener: a thread accepting connections, a thread per connection.

    Args:
        state: the server's state (blobs, store, metrics).
        host: the address to bind (the gRPC server's).
        port: the port (0: any free one; see `port`).
        tls: wrap every connection with this server context (the gRPC server's certificate).
        ticket_lifetime: seconds a ticket stays good.
        max_connections: transfers at once.

    Raises:
        OSError: the port cannot be bound.
    """

    def __init__(self, state: ServiceState, host: str, port: int, *,
                 tls: ssl.SSLContext | None = None, ticket_lifetime: float = TICKET_LIFETIME_S,
                 max_connections: int = MAX_CONNECTIONS):
        self.state, self.tls = state, tls
        self.tickets = Tickets(ticket_lifetime)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host.strip("[]"), port), family=family,
                                              backlog=max_connections)
        self.port: int = self._listener.getsockname()[1]
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopped = False
        self._acceptor = threading.Thread(target=self._accept, name="dptrain-data-port",
                                          daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------ tickets

    def download_ticket(self, place: DownloadPlace) -> bytes:
        """A ticket for the bytes ``[offset, place.end)`` of a located download; the ticket
        owns the place's lease from now on."""
        return self.tickets.issue(place)

    def fetch_ticket(self, place: FetchPlace) -> bytes:
        """A ticket for every file of a located fetch, one after the other; the ticket owns
        the place's lease from now on."""
        return self.tickets.issue(place)

    def upload_ticket(self, upload: CheckpointUpload) -> bytes:
        """A ticket for an upload whose header passed `checkpoint_store.check_worker_upload`."""
        return self.tickets.issue(_Upload(upload))

    # ------------------------------------------------------------ serving

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            if not self._slots.acquire(blocking=False):
                self.state.metrics.count_data_connection("busy")
                _answer(conn, "UNAVAILABLE", "the data port serves too many transfers: try "
                        "again")
                conn.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name="dptrain-data")
            with self._lock:
                if self._stopped:
                    conn.close()
                    self._slots.release()
                    return
                self._open.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        raw, outcome = conn, "broken"
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            grant = self.tickets.redeem(recv_exactly(conn, TICKET_BYTES))
            if grant is None:
                outcome = "refused"
                _answer(conn, "ABORTED", "unknown, used or expired data ticket: ask for a new "
                        "one through the gRPC call")
                return
            conn.settimeout(IO_TIMEOUT_S)
            if isinstance(grant, DownloadPlace):
                self._send(conn, [(grant.path, grant.offset, grant.end)], grant.lease)
            elif isinstance(grant, FetchPlace):
                self._send(conn, [(path, 0, f.size) for path, f in
                                  zip(grant.paths, grant.header.files)], grant.lease)
            elif not self._receive(conn, grant.upload):
                return
            outcome = "served"
        except (OSError, ValueError) as e:  # a peer gone, silent or speaking nonsense
            log.debug("data port connection ended: %s", e)
        except Exception:
            log.exception("data port connection failed")
        finally:
            self.state.metrics.count_data_connection(outcome)
            conn.close()
            with self._lock:
                self._open.discard(raw)
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _send(self, conn: socket.socket, ranges: Iterable[tuple[Path, int, int]],
              lease: BlobLease) -> None:
        """A download or a fetch: OK, then each ``(file, offset, end)``'s bytes from the file
        in turn; `lease` released at the end."""
        try:
            conn.sendall(encode_status("OK"))
            for path, offset, end in ranges:
                with open(path, "rb") as f:
                    while offset < end:
                        sent = send_file(conn, f, offset, min(_SEND_BYTES, end - offset))
                        if not sent:
                            raise ConnectionError("the blob file ended early")
                        offset += sent
                        self.state.metrics.add_checkpoint_bytes("served", sent)
                        self.state.metrics.add_data_bytes("sent", sent)
        finally:
            lease.release()

    def _receive(self, conn: socket.socket, upload: CheckpointUpload) -> bool:
        """An upload: OK, then each file's bytes into `receive_checkpoint`; the status the
        stream would have ended with, and the record. False when the peer left before its
        last byte (nobody to answer)."""
        conn.sendall(encode_status("OK"))
        left = [sum(f.size for f in upload.files)]

        def chunks() -> Iterator[tuple[str, bytes]]:
            try:
                for name, data in receive_files(conn, upload.files):
                    left[0] -= len(data)
                    self.state.metrics.add_data_bytes("received", len(data))
                    yield name, data
            except OSError as e:  # closed, reset or silent: DataWireError among them
                raise _PeerGone(str(e)) from None

        try:
            record = checkpoints.receive_checkpoint(upload, chunks(), self.state)
        except _PeerGone as e:  # nothing stored; nobody to answer
            log.info("job %s: the upload of step %s over the data port broke off: %s",
                     upload.job_id, upload.step, e)
            return False
        except Exception as e:
            code, message = answer_of(e)
            # So that the sender finishes and reads the answer (bytes moved all the same).
            self.state.metrics.add_data_bytes("received", _drain(conn, left[0]))
            conn.sendall(encode_status(code.name, message))
            return True
        conn.sendall(encode_status(
            "OK", body=serde.checkpoint_to_proto(record).SerializeToString()))
        return True

    def stop(self) -> None:
        """Stop listening, end every open transfer (a broken upload stores nothing) and forget
        the tickets. Idempotent."""
        with self._lock:
            self._stopped = True
            conns, threads = list(self._open), list(self._threads)
        try:  # wakes the accepting thread (closing alone would not, on Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join()
        self._acceptor.join()
        self.tickets.close()


def _answer(conn: socket.socket, code: str, message: str) -> None:
    try:
        conn.sendall(encode_status(code, message))
    except OSError:
        pass


def _drain(conn: socket.socket, size: int) -> int:
    """Read and drop the `size` bytes the sender still has for us; returns how many came."""
    got = 0
    while got < size:
        data = conn.recv(min(CHUNK_BYTES, size - got))
        if not data:
            break
        got += len(data)
    return got
