"""The wheel users install: one import package, ``dptrain``, holding every package folder of
the repository, and the ``dptrain`` command. Built here from the working tree, as pip would
build it for a user, and read back as a zip file."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: The folders the ``dptrain`` package is made of (pyproject's ``package-dir`` maps the
#: repository root to ``dptrain``).
PACKAGE_FOLDERS = ("engine", "worker", "coordinator", "protos")


@pytest.fixture(scope="module")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out, sources = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "dptrain"
    # Built from a copy, so that the build's own files (build/, *.egg-info) stay out of the
    # working tree and no earlier build's leftovers get into the wheel.
    shutil.copytree(repo_root, sources, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(out), str(sources)],
        cwd=out, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [built] = out.glob("dptrain-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def _version(repo_root: Path) -> str:
    return re.search(r'^version = "([^"]+)"$', (repo_root / "pyproject.toml").read_text(),
                     re.M)[1]


def test_the_wheel_installs_one_top_level_name(wheel, repo_root):
    top = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert top == {"dptrain", f"dptrain-{_version(repo_root)}.dist-info"}


def test_every_package_folder_is_in_the_wheel(wheel, repo_root):
    folders = sorted(str(init.parent.relative_to(repo_root))
                     for name in PACKAGE_FOLDERS
                     for init in (repo_root / name).rglob("__init__.py"))
    assert "coordinator/server/launchers" in folders  # the walk does reach nested packages
    packaged = set(wheel.namelist())
    missing = [f for f in folders if f"dptrain/{f}/__init__.py" not in packaged]
    assert not missing, f"package folders pyproject's `packages` list leaves out: {missing}"
    assert "dptrain/__init__.py" in packaged


def test_the_dptrain_command_runs_the_coordinator_cli(wheel, repo_root):
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {"dptrain": "dptrain.coordinator.cli:main"}
