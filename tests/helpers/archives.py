"""Hostile code archives, built by hand with tarfile: each tries to write outside the
directory it is unpacked into, or to create something that is not a plain file."""

from __future__ import annotations

import io
import tarfile


def hostile(members: list[tarfile.TarInfo]) -> bytes:
    """A gzip-compressed tar holding exactly `members` (files of ``b"x" * size``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    """A member named `name` of type `kind` (a link's `target`)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


HOSTILE = {
    "dotdot": [member("ok.py"), member("../escaped.py")],
    "nested-dotdot": [member("pkg/../../escaped.py")],
    "absolute": [member("/tmp/escaped.py")],
    "symlink-out": [member("link", tarfile.SYMTYPE, "/etc"), member("link/passwd")],
    "hardlink": [member("hard", tarfile.LNKTYPE, "/etc/passwd")],
    "device": [member("dev", tarfile.CHRTYPE)],
    "fifo": [member("fifo", tarfile.FIFOTYPE)],
}
"""Case name -> the members of a hostile archive."""
