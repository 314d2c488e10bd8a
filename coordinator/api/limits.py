"""Every size limit of the gRPC API, in one place, so server and clients agree on them.

gRPC refuses messages above its receive limit (4 MiB by default) with RESOURCE_EXHAUSTED. We set
the limit explicitly on both ends rather than relying on the default, and keep every chunk of a
streamed file well under it, so no legal message comes near the edge: a 1 MiB chunk plus its
few bytes of framing is a quarter of the limit.
"""

from __future__ import annotations

__all__ = [
    "MAX_MESSAGE_BYTES", "CHUNK_BYTES", "MAX_SPEC_BYTES", "MAX_ARGS_JSON_BYTES",
    "MAX_MANIFEST_BYTES", "MAX_LOG_LINE", "MAX_EVENTS_PER_REPORT", "MAX_CHECKPOINT_FILES",
    "MAX_RESTARTS", "DEFAULT_MAX_CHECKPOINT_BYTES", "MAX_PAGE_SIZE", "MAX_METRIC_NAMES",
    "MAX_ARGS_DEPTH", "MAX_MANIFEST_DEPTH", "MAX_TIME_LIMIT_S", "MAX_ERROR_MESSAGE",
    "channel_options",
]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""The largest message either side sends or accepts (gRPC's default, set explicitly)."""

CHUNK_BYTES = 1024 * 1024
"""Bytes per chunk of a streamed checkpoint file (upload, download, fetch)."""

MAX_SPEC_BYTES = 32 * 1024
"""The largest serialized JobSpec a submission may carry (real ones are under 1 KiB); with
`MAX_PAGE_SIZE` it keeps a page of jobs well under `MAX_MESSAGE_BYTES`."""

MAX_ARGS_JSON_BYTES = 16 * 1024
"""The largest ``args_json`` of a model, data set or scheduler."""

MAX_ARGS_DEPTH = 32
"""The most levels of arrays and objects an ``args_json`` may nest (real ones: two or three).
Python's JSON parser recurses per level: unbounded, a few thousand brackets under the size
limit would exhaust the stack."""

MAX_PAGE_SIZE = 100
"""The most jobs one ListJobs page holds."""

MAX_METRIC_NAMES = 100
"""The most metric names a job's latest-metrics summary keeps."""

MAX_MANIFEST_BYTES = 1024 * 1024
"""The largest checkpoint ``manifest.json``."""

MAX_MANIFEST_DEPTH = 64
"""The most levels a ``manifest.json`` may nest: it holds the job spec, so the args' limit
plus a few levels."""

MAX_ERROR_MESSAGE = 1000
"""Characters of an error message a call fails with; longer ones are cut (with "...")."""

MAX_LOG_LINE = 4096
"""Characters of a log line kept; longer lines are cut (with a marker)."""

MAX_EVENTS_PER_REPORT = 1000
"""Events one ReportProgress may carry."""

MAX_CHECKPOINT_FILES = 16
"""Files one checkpoint may have besides manifest.json."""

MAX_RESTARTS = 100
"""The largest ``max_restarts`` a job may ask for."""

MAX_TIME_LIMIT_S = 366 * 24 * 3600
"""The longest ``time_limit`` of one run a job may give: a leap year, in seconds."""

DEFAULT_MAX_CHECKPOINT_BYTES = 8 * 1024**3
"""The default limit on one stored checkpoint file (the server's ``max_checkpoint_bytes``)."""


def channel_options() -> list[tuple[str, int]]:
    """The message-size options of every channel and server we create.

    Returns:
        ``[(option, value), ...]`` for ``grpc.server``/``grpc.*_channel``.
    """
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
