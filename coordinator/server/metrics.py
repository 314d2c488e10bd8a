"""Operator metrics in Prometheus' text format, served over plain HTTP: no grpc, no dependency.

Exposed at ``http://HOST:METRICS_PORT/metrics``:

======================================= ========= =============================================
``dptrain_jobs{state}``                 gauge     jobs in each state
``dptrain_queue_length``                gauge     jobs waiting for slots (QUEUED + RESTARTING)
``dptrain_rpc_duration_seconds{method}`` histogram RPC latency, streams until their last message
``dptrain_rpc_requests_total{method,code}`` counter RPCs by final status code
``dptrain_checkpoint_bytes_total{direction}`` counter checkpoint bytes ``stored`` or ``served``
``dptrain_data_connections_total{outcome}`` counter data port connections by how they ended
``dptrain_data_bytes_total{direction}``  counter  bytes over the data port, ``sent``/``received``
======================================= ========= =============================================

A data port connection ends ``served`` (its transfer ran to the end and was answered, a refused
upload included), ``refused`` (an unknown, used or expired ticket), ``busy`` (turned away at
the bound on connections at once) or ``broken`` (the peer left, fell silent or failed TLS).

The endpoint shows counts only (no job names or ids) and is bound to the gRPC server's host.
"""

from __future__ import annotations

import bisect
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from dptrain.coordinator.api.records import PENDING_STATES, JobState

if TYPE_CHECKING:
    from dptrain.coordinator.server.store import Store

__all__ = ["Metrics", "MetricsHTTPServer", "LATENCY_BUCKETS", "CONTENT_TYPE",
           "DATA_OUTCOMES"]

#: Upper bounds (seconds) of the latency histogram's buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How a data port connection can end (``dptrain_data_connections_total``'s outcomes).
DATA_OUTCOMES = ("served", "refused", "busy", "broken")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Metrics:
    """Thread-safe counters and histograms; `render` writes them with the store's gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._requests: dict[tuple[str, str], int] = {}
        self._bytes: dict[str, int] = {"stored": 0, "served": 0}
        self._data_connections: dict[str, int] = dict.fromkeys(DATA_OUTCOMES, 0)
        self._data_bytes: dict[str, int] = {"sent": 0, "received": 0}

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC.

        Args:
            method: its full name, e.g. ``/dptrain.v1.Coordinator/GetJob``.
            code: the status code's name, e.g. ``OK``.
            seconds: how long it took.
        """
        with self._lock:
            counts = self._buckets.setdefault(method, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sums[method] = self._sums.get(method, 0.0) + seconds
            self._requests[method, code] = self._requests.get((method, code), 0) + 1

    def add_checkpoint_bytes(self, direction: str, n: int) -> None:
        """Count checkpoint bytes.

        Args:
            direction: ``stored`` (uploads) or ``served`` (downloads and fetches).
            n: how many bytes.
        """
        with self._lock:
            self._bytes[direction] = self._bytes.get(direction, 0) + n

    def count_data_connection(self, outcome: str) -> None:
        """Count one data port connection that ended.

        Args:
            outcome: one of `DATA_OUTCOMES`.
        """
        with self._lock:
            self._data_connections[outcome] += 1

    def add_data_bytes(self, direction: str, n: int) -> None:
        """Count bytes moved over the data port.

        Args:
            direction: ``sent`` (downloads and fetches) or ``received`` (uploads).
            n: how many bytes.
        """
        with self._lock:
            self._data_bytes[direction] += n

    def checkpoint_bytes(self, direction: str) -> int:
        """The bytes counted so far in one direction."""
        with self._lock:
            return self._bytes.get(direction, 0)

    def render(self, store: Store | None = None) -> str:
        """Everything in Prometheus' text exposition format.

        Args:
            store: where the job gauges come from (None: no job gauges).

        Returns:
            The text, ending with a newline.
        """
        lines: list[str] = []
        if store is not None:
            counts = store.count_by_state()
            lines += ["# HELP dptrain_jobs Jobs in each state.", "# TYPE dptrain_jobs gauge"]
            lines += [f'dptrain_jobs{{state="{s.value}"}} {counts.get(s, 0)}' for s in JobState]
            lines += ["# HELP dptrain_queue_length Jobs waiting for slots.",
                      "# TYPE dptrain_queue_length gauge",
                      f"dptrain_queue_length {sum(counts.get(s, 0) for s in PENDING_STATES)}"]
        with self._lock:
            buckets = {m: list(c) for m, c in self._buckets.items()}
            sums, requests, sent = dict(self._sums), dict(self._requests), dict(self._bytes)
            connections, moved = dict(self._data_connections), dict(self._data_bytes)
        lines += ["# HELP dptrain_rpc_duration_seconds RPC latency by method.",
                  "# TYPE dptrain_rpc_duration_seconds histogram"]
        for method in sorted(buckets):
            m, cumulative = _label(method), 0
            for bound, count in zip(LATENCY_BUCKETS, buckets[method]):
                cumulative += count
                lines.append(f'dptrain_rpc_duration_seconds_bucket{{method="{m}",'
                             f'le="{bound}"}} {cumulative}')
            total = sum(buckets[method])
            lines += [f'dptrain_rpc_duration_seconds_bucket{{method="{m}",le="+Inf"}} {total}',
                      f'dptrain_rpc_duration_seconds_sum{{method="{m}"}} '
                      f'{_number(sums[method])}',
                      f'dptrain_rpc_duration_seconds_count{{method="{m}"}} {total}']
        lines += ["# HELP dptrain_rpc_requests_total RPCs by method and status code.",
                  "# TYPE dptrain_rpc_requests_total counter"]
        lines += [f'dptrain_rpc_requests_total{{method="{_label(m)}",code="{c}"}} {n}'
                  for (m, c), n in sorted(requests.items())]
        lines += ["# HELP dptrain_checkpoint_bytes_total Checkpoint bytes stored and served.",
                  "# TYPE dptrain_checkpoint_bytes_total counter"]
        lines += [f'dptrain_checkpoint_bytes_total{{direction="{d}"}} {n}'
                  for d, n in sorted(sent.items())]
        lines += ["# HELP dptrain_data_connections_total Data port connections by outcome.",
                  "# TYPE dptrain_data_connections_total counter"]
        lines += [f'dptrain_data_connections_total{{outcome="{o}"}} {n}'
                  for o, n in sorted(connections.items())]
        lines += ["# HELP dptrain_data_bytes_total Bytes over the data port by direction.",
                  "# TYPE dptrain_data_bytes_total counter"]
        lines += [f'dptrain_data_bytes_total{{direction="{d}"}} {n}'
                  for d, n in sorted(moved.items())]
        return "\n".join(lines) + "\n"


class _HTTPServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsHTTPServer:
    """``GET /metrics`` on a plain HTTP server in a daemon thread.

    Args:
        host: the address to bind.
        port: the port (0: any free one; see `port`).
        render: returns the page's text.
    """

    def __init__(self, host: str, port: int, render: Callable[[], str]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # scrapes every few seconds would flood the server's log

        server_class = _HTTPServerV6 if ":" in host else ThreadingHTTPServer
        self._server = server_class((host.strip("[]"), port), Handler)
        self._server.daemon_threads = True
        # A short poll interval: stop() waits for the serving loop to notice, up to one poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="dptrain-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self._server.server_address[1]

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
