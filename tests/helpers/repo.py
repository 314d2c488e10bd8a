"""The repository's root, for tests that read its files or run commands from it (the test
files sit at different depths under ``tests/``, so none of them counts ``parents`` itself)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
