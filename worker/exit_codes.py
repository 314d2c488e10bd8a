"""The exit codes of a worker rank (``python -m dptrain.worker``), defined once.

A module of its own, importing nothing heavy, so that the coordinator's runner can tell how a
job ended without loading the training loop and the engine. ``worker/train.py`` says what each
code means.
"""

from __future__ import annotations

import signal

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_INVALID", "EXIT_DIVERGED", "EXIT_DISK_FULL",
           "EXIT_PREEMPTED"]

EXIT_OK = 0
"""The run completed."""
EXIT_FAILED = 1
"""A rank raised: its error is printed and the whole job is aborted."""
EXIT_INVALID = 2
"""The job cannot start: invalid spec, data, model module or checkpoint."""
EXIT_DIVERGED = 3
"""The loss became non-finite."""
EXIT_DISK_FULL = 4
"""A checkpoint could not be written: no space left (ENOSPC, or the quota's EDQUOT)."""
EXIT_PREEMPTED = 128 + signal.SIGTERM
"""Preempted by SIGTERM after writing a checkpoint (what a shell reports for SIGTERM)."""
