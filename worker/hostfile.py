"""Hostfiles: the one parser of the file that names the machines a job's ranks run on.

``dptrain run --hostfile`` and ``dptrain serve --hostfile`` read the same file through
`read_hostfile`; neither hands it to ``mpiexec`` as it is. The result is a *placement*: ``(host,
slots)`` pairs in file order, which `dptrain.worker.mpiexec_command` writes in Hydra's own
``-hosts host:N,...`` form and the coordinator's scheduler divides among jobs.

The syntax accepts what users bring from MPICH and Open MPI::

    # two nodes
    node1:8            # MPICH: 8 slots
    node2 slots=4      # Open MPI
    node3              # 1 slot

Blank lines are skipped and ``#`` starts a comment; a repeated host is an error (its slots
would be ambiguous), so is a file without hosts.
"""

from __future__ import annotations

import os
import re

__all__ = ["HostfileError", "Placement", "parse_hostfile", "read_hostfile", "hosts_argument",
           "LOCAL_HOSTS", "is_local"]

#: ``(host, slots)`` pairs: where the ranks of one job run, numbered in this order.
Placement = tuple[tuple[str, int], ...]

#: Names that mean this machine: ``mpiexec`` starts their ranks without a remote shell.
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COLON_LINE = re.compile(r"^(?P<host>[^\s:]+)(?::(?P<slots>[^\s:]*))?$")
_SLOTS_LINE = re.compile(r"^(?P<host>[^\s:]+)\s+slots\s*=\s*(?P<slots>\S*)$")


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message starts with ``file:line:`` (``file:`` for
    the file as a whole).

    Args:
        source: the file's name.
        line: the 1-based line number (0: the file as a whole).
        message: what is wrong.
    """

    def __init__(self, source: str, line: int, message: str):
        self.source, self.line = source, line
        super().__init__(f"{source}:{line}: {message}" if line else f"{source}: {message}")


def parse_hostfile(text: str, source: str = "<hostfile>") -> Placement:
    """Parse a hostfile's text (the syntax is in the module docstring).

    Args:
        text: the file's content.
        source: the name used in error messages.

    Returns:
        ``(host, slots)`` pairs in file order.

    Raises:
        HostfileError: ``source:line: what is wrong, got 'value'``.

    Example:
        >>> parse_hostfile("node1:8\\nnode2 slots=4  # rack 2\\nnode3\\n")
        (('node1', 8), ('node2', 4), ('node3', 1))
    """
    hosts: list[tuple[str, int]] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _COLON_LINE.match(line) or _SLOTS_LINE.match(line)
        if match is None:
            raise HostfileError(source, number, "expected 'host', 'host:slots' or "
                                f"'host slots=N', got {line!r}")
        name, slots_text = match["host"], match["slots"]
        if not _HOST_RE.match(name):
            raise HostfileError(source, number, "host: must be letters, digits, '.', '_' "
                                f"or '-', starting with a letter or digit, got {name!r}")
        slots = 1 if slots_text is None else _positive_int(slots_text)
        if slots is None:
            raise HostfileError(source, number,
                                f"slots: must be an integer >= 1, got {slots_text!r}")
        if name in first_line:
            raise HostfileError(source, number, f"host {name!r} is listed again (first on "
                                f"line {first_line[name]}); give it one line with its slots")
        first_line[name] = number
        hosts.append((name, slots))
    if not hosts:
        raise HostfileError(source, 0, "lists no hosts")
    return tuple(hosts)


def read_hostfile(path: str | os.PathLike) -> Placement:
    """Read and parse a hostfile (see `parse_hostfile`).

    Raises:
        HostfileError: unreadable, or a bad line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(os.fspath(path), 0, f"cannot read the hostfile: {e}") from None
    return parse_hostfile(text, os.fspath(path))


def is_local(placement: Placement) -> bool:
    """True for a placement on this machine alone: ``mpiexec`` then needs no host list."""
    return all(host in LOCAL_HOSTS for host, _ in placement)


def hosts_argument(placement: Placement) -> str:
    """The placement in Hydra's ``-hosts`` form: ``node1:4,node2:2``."""
    return ",".join(f"{host}:{n}" for host, n in placement)


def _positive_int(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) >= 1 else None
