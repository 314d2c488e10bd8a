"""A small file system of its own for a test: a tmpfs of a few MiB mounted on a directory, so
that writes into it meet a real ENOSPC (and SQLite a real SQLITE_FULL) while the rest of the
machine has room.

Mounting needs root (CI runs as root, and ``.ci/run`` requires every test); elsewhere the test
is skipped with the reason, as it is where the kernel or the container refuses the mount.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["small_disk", "fill"]


@contextmanager
def small_disk(directory: Path, size_mib: int = 8) -> Iterator[Path]:
    """Mount a `size_mib` MiB tmpfs on `directory` (created) for the block; always unmounted.

    Skips the test, with the reason, when not root or when the mount is refused.
    """
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root to mount (CI runs these as root)")
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700",
                              "tmpfs", str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system of `directory` with a file, leaving about `leave` bytes free.

    Returns:
        The file: delete it to free the space again.
    """
    filler = directory / "filler"
    stat = os.statvfs(directory)
    size = max(0, stat.f_bavail * stat.f_frsize - leave)
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * (1 << 20)
        try:
            while size > 0:
                size -= f.write(block[:min(size, len(block))])
        except OSError:  # full a little early (the file's own blocks): as full as it gets
            pass
    return filler
