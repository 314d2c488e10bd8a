"""The wheel users install: one import package, ``dptrain``, holding every package folder of
the repository, and the ``dptrain`` command. Built here from the working tree, as pip would
build it for a user, and read back as a zip file."""

from __future__ import annotations

import configparser
import os
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


#: Import name -> distribution for optional dependencies this machine may not have installed.
NOT_INSTALLED_HERE = {"cupy": ["cupy-cuda12x"], "cupyx": ["cupy-cuda12x"]}


def _requirements(wheel: zipfile.ZipFile) -> tuple[set[str], dict[str, set[str]]]:
    """The wheel's Requires-Dist: names always installed, and extra -> names."""
    [metadata] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    always: set[str] = set()
    extras: dict[str, set[str]] = {}
    for line in wheel.read(metadata).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = line.split(":", 1)[1].strip()
        name = re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower().replace("_", "-")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra:
            extras.setdefault(extra[1], set()).add(name)
        else:
            always.add(name)
    return always, extras


def _third_party_imports(path: Path) -> set[str]:
    """The distributions (lower-case names) of the non-stdlib modules a file imports."""
    import ast
    from importlib.metadata import packages_distributions

    tree = ast.parse(path.read_text(), str(path))
    tops = {alias.name.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.Import) for alias in node.names}
    tops |= {node.module.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    tops -= set(sys.stdlib_module_names) | {"dptrain", "__future__"}
    mapping = {**packages_distributions(), **NOT_INSTALLED_HERE}
    return {dist.lower().replace("_", "-") for top in tops for dist in mapping.get(top, [top])}


def test_pip_install_alone_runs_the_demo_and_the_digits_examples(wheel, repo_root):
    """What the demo and the digits examples import is installed with dptrain itself (not only
    by the dev extra), and every import of the package is a requirement or an optional extra."""
    always, extras = _requirements(wheel)
    optional = set().union(*(names for extra, names in extras.items()
                             if extra != "dev" and not extra.startswith("test")))
    demo_path = [repo_root / "coordinator/demo.py", repo_root / "worker/data.py",
                 *sorted((repo_root / "examples").glob("digits_*.py"))]
    needed = set().union(*(_third_party_imports(path) for path in demo_path))
    assert "scikit-learn" in needed  # the digits data: the walk does see it
    assert needed <= always, f"not installed by `pip install dptrain`: {needed - always}"
    for name in PACKAGE_FOLDERS:
        for path in (repo_root / name).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            missing = _third_party_imports(path) - always - optional
            assert not missing, f"{path.relative_to(repo_root)} imports {missing}: not required"


def test_the_proto_files_ship_where_proto_path_says(wheel, repo_root, tmp_path):
    """Clients in other languages build stubs from the installed .proto files: every one is in
    the wheel, byte for byte, under the directory ``dptrain proto-path`` prints once installed
    (the wheel unpacked as pip would, the command run from there)."""
    from dptrain.protos import PROTO_FILES

    assert PROTO_FILES == ("dptrain/v1/coordinator.proto",)
    for name in PROTO_FILES:
        assert wheel.read(f"dptrain/protos/{name}") == (repo_root / "protos" / name).read_bytes()
    site = tmp_path / "site"
    wheel.extractall(site)
    printed = subprocess.run(
        [sys.executable, "-c", "import sys; from dptrain.coordinator.cli import main; "
         "sys.exit(main(['proto-path']))"], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == f"{site / 'dptrain' / 'protos'}\n"
    assert (Path(printed.stdout.strip()) / PROTO_FILES[0]).is_file()
