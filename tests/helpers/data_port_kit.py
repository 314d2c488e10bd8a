"""Shared by the data port's tests (``tests/coordinator/test_data_port*.py``): a job moved to
RUNNING with a worker client holding its token, and a TCP forwarder that stands for the
network between client and coordinator."""

from __future__ import annotations

import socket
import threading

from jobkit import TINY_SPEC

from dptrain.coordinator.api.data_wire import read_status
from dptrain.coordinator.api.records import JobState, hash_token, new_token
from dptrain.coordinator.client.client import Client
from dptrain.coordinator.client.worker_client import WorkerClient

__all__ = ["SPEC", "TOKENS", "running_job", "present", "Forwarder"]

SPEC = {**TINY_SPEC, "workers": 1}

TOKENS: dict[str, str] = {}  # job id -> its worker token, for the calls made by hand


def running_job(server, address: str | None = None, **client) -> tuple[str, WorkerClient]:
    """A job moved to RUNNING as the runner does, and a client with its worker token."""
    with Client(server.address, token=server.token) as c:
        job = c.submit_job(SPEC)
    token = TOKENS[job.id] = new_token()
    server.store.transition(job.id, JobState.QUEUED, JobState.RUNNING,
                            token_hash=hash_token(token), placement={"localhost": 1})
    return job.id, WorkerClient(address or server.address, job.id, token, timeout=30, **client)


def present(port: int, ticket: bytes) -> tuple[socket.socket, tuple[str, str, bytes]]:
    """A connection to the data port on 127.0.0.1 that presented `ticket`, and the answer."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(ticket)
    return sock, read_status(sock)


class Forwarder:
    """Listens on 127.0.0.2:`port` and forwards each connection to 127.0.0.1:`port`; the
    first connection is cut after `cut_after` bytes from the server when that is given, and
    the byte at `flip_at` of what the server sends on it is inverted (damage on the way)."""

    def __init__(self, port: int, cut_after: int | None = None, flip_at: int | None = None):
        self.port, self.cut_after, self.flip_at, self.connections = port, cut_after, flip_at, 0
        self._listener = socket.create_server(("127.0.0.2", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            cut, flip = (self.cut_after, self.flip_at) if first else (None, None)
            outbound = socket.create_connection(("127.0.0.1", self.port))
            for args in ((inbound, outbound, None, None), (outbound, inbound, cut, flip)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None,
              flip_at: int | None) -> None:
        moved = 0
        try:
            while data := src.recv(1 << 16 if limit is None else min(1 << 16, limit - moved)):
                if flip_at is not None and moved <= flip_at < moved + len(data):
                    data = bytearray(data)
                    data[flip_at - moved] ^= 0xFF
                dst.sendall(data)
                moved += len(data)
                if limit is not None and moved >= limit:
                    break
        except OSError:
            pass
        for s in (src, dst):  # ends the other direction's pump too
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
