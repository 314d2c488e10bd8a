"""Following a job's ``worker.log``: `LogTail` returns an attempt's new lines as they are
written, `LineRateLimit` bounds how many of them become ``log`` events, `failure_message` turns a
failed attempt's last lines into the job's error."""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["LogTail", "LineRateLimit", "failure_message"]


class LogTail:
    """Follows a log file from an offset and returns its complete new lines.

    Lines are decoded leniently; of a line rewritten with carriage returns (a progress bar)
    only the last version is kept, and very long lines are cut. The last `keep` lines and
    the last JSON object line with a ``status`` (the worker's final metrics) are remembered.

    Args:
        path: the log file.
        offset: where this attempt's output begins.
        keep: how many recent lines to remember (for a failed job's error).
        max_line: characters kept of one line.
    """

    def __init__(self, path: Path, offset: int = 0, keep: int = 20, max_line: int = 4000):
        self.path, self.offset, self.max_line = path, offset, max_line
        self.recent: deque[str] = deque(maxlen=keep)
        self.final_metrics: dict[str, Any] | None = None
        self._partial = b""

    def read(self, final: bool = False) -> list[str]:
        """The lines written since the last call.

        Args:
            final: the writer has exited: return an unterminated last line too.
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            data = b""
        self.offset += len(data)
        data = self._partial + data
        parts = data.split(b"\n")
        self._partial = parts.pop()
        if final:
            if self._partial:
                parts.append(self._partial)
            self._partial = b""
        lines = []
        for raw in parts:
            line = raw.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1].rstrip()
            if len(line) > self.max_line:
                line = line[:self.max_line] + " …"
            lines.append(line)
            self.recent.append(line)
            if '"status"' in line:
                parsed = _json_object(line)
                if parsed is not None and "status" in parsed:
                    self.final_metrics = parsed
        return lines


def _json_object(line: str) -> dict | None:
    """The JSON object that ends `line`, if any. mpiexec merges the ranks' stdout and stderr
    into one file in whatever order they arrive, so the worker's final JSON line (stdout) may
    follow a progress-bar update (stderr, no newline) on the same line."""
    start = line.find("{")
    while start >= 0:
        try:
            parsed = json.loads(line[start:])
        except ValueError:
            start = line.find("{", start + 1)
            continue
        return parsed if isinstance(parsed, dict) else None
    return None


class LineRateLimit:
    """A token bucket over log lines: `rate` per second, `burst` at once.

    Args:
        rate: lines per second.
        burst: the bucket's size.
        clock: the monotonic clock (tests pass a fake one).
    """

    def __init__(self, rate: float, burst: int, clock: Any = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp = float(burst), clock()
        self.dropped = 0

    def admit(self, n: int) -> int:
        """How many of `n` new lines may be streamed now (the first ones); the rest count
        as dropped."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        allowed = min(n, int(self.tokens))
        self.tokens -= allowed
        self.dropped += n - allowed
        return allowed

    def take_dropped(self) -> int:
        """The number of lines dropped since the last call (and reset it)."""
        dropped, self.dropped = self.dropped, 0
        return dropped


def failure_message(lines: list[str], code: int, detail: str = "", note: str = "") -> str:
    """A failed attempt's error: one line saying what happened, then its last log lines.

    Args:
        lines: the attempt's last log lines.
        code: the attempt's exit code.
        detail: why the runner ended the group, if it did (replaces the exit code line).
        note: appended to the first line, e.g. that the restarts are used up.

    Returns:
        The message; its first line names the likeliest cause (the last line mentioning an
        error or a failure, else the last line).
    """
    lines = [line for line in lines if line.strip()]
    if detail:
        summary = detail
    else:
        cause = next((line for line in reversed(lines) if "error" in line.lower()
                      or "failed" in line.lower()), lines[-1] if lines else "")
        summary = f"the worker group exited with code {code}" + (f": {cause}" if cause else "")
    return summary + note + ("\nlast log lines:\n" + "\n".join(lines) if lines else "")
