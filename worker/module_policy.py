"""What code a job sent to a coordinator may run: the rule for its ``package.module:function``
references and its ``entrypoint``, written once for the coordinator (at submission) and the
workers (again before they import anything).

A reference resolves only to

- the job's own shipped code (``code: "sha256:..."``): its module's top-level name is one of
  the archive's top-level modules (``mymodels.py``, ``mypkg/``) — never a name of the standard
  library or ``dptrain``, which an import would find elsewhere first;
- the model zoo: a constructor registered in ``dptrain.engine.models`` (`zoo_references`), not
  the zoo's machinery (``get_model`` would import whatever its argument names);
- an installed module under a prefix an admin allows (``dptrain serve --allow-module PREFIX``,
  none by default), matched on whole dotted components: ``mylab`` allows ``mylab.models:f``,
  not ``mylabx:f``.

Everything else (``os:system``, ``subprocess:run``, ``builtins:eval``, ...) is refused. The rule
is a pure function of strings (`reference_rule`): the coordinator decides from the stored code
archive's listing without importing or running anything. An ``entrypoint`` must name a script
of the shipped code.

The workers learn the coordinator's prefixes from `ALLOWED_MODULES` in their environment and
check again (`check_job_code`), so a job stored by a coordinator that allowed more is refused at
its next launch. ``dptrain run`` (the user's own machine, no coordinator) leaves the variable
unset and runs whatever the job names.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shlex
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from dptrain.worker.environment import ALLOWED_MODULES
from dptrain.worker.spec_errors import FieldError, JobSpecError

if TYPE_CHECKING:
    from dptrain.worker.spec import JobSpec

__all__ = ["ALLOW_HOW", "check_prefix", "shipped_modules", "zoo_references",
           "reference_rule", "reference_fields", "spec_code_errors", "allowed_from_environment",
           "check_job_code"]

ALLOW_HOW = "an admin allows installed modules with `dptrain serve --allow-module PREFIX`"

#: Top-level names a job's shipped code cannot claim: an import finds these elsewhere first.
_NOT_SHIPPABLE = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | {
    "dptrain", "__main__"}


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def check_prefix(prefix: str) -> str:
    """An ``--allow-module`` prefix, checked.

    Args:
        prefix: dotted Python identifiers, e.g. ``mylab`` or ``mylab.models``.

    Returns:
        The prefix.

    Raises:
        ValueError: naming ``--allow-module``, the rule and the value.
    """
    if not isinstance(prefix, str) or not _dotted(prefix):
        raise ValueError(f"--allow-module: must be a module prefix of dotted Python "
                         f"identifiers (e.g. mylab.models), got {prefix!r}")
    return prefix


def shipped_modules(files: Iterable[str]) -> frozenset[str]:
    """The top-level modules a code archive provides, from its file names alone.

    Args:
        files: the archive's file names (``/``-separated, relative), e.g. its listing.

    Returns:
        ``mymodels`` for ``mymodels.py``, ``mypkg`` for ``mypkg/...``; names of the standard
        library and ``dptrain`` are left out (an import would not find them in the code).

    Example:
        >>> sorted(shipped_modules(["mymodels.py", "pkg/__init__.py", "os.py", "README.md"]))
        ['mymodels', 'pkg']
    """
    names = set()
    for name in files:
        parts = PurePosixPath(name).parts
        if len(parts) > 1:
            top = parts[0]
        elif parts and parts[0].endswith(".py"):
            top = parts[0][:-3]
        else:
            continue
        if top.isidentifier():
            names.add(top)
    return frozenset(names - _NOT_SHIPPABLE)


@functools.lru_cache(maxsize=1)
def zoo_references() -> frozenset[str]:
    """The references that name a model of the zoo: ``module:name`` of each registered
    constructor, and ``dptrain.engine.models:name`` where the package exports it.

    Example:
        >>> "dptrain.engine.models:LeNet" in zoo_references()
        True
    """
    from dptrain.engine import models  # the project's own code: importing it runs no job's

    # The project's own constructors: a model registered by other code in this process (a
    # user's, a test's) is not the zoo.
    constructors = [fn for fn in map(models.get_constructor, models.list_models())
                    if _under(fn.__module__, models.__name__)]
    out = {f"{models.__name__}:{name}" for name, value in vars(models).items()
           if any(value is fn for fn in constructors)}
    out |= {f"{fn.__module__}:{fn.__qualname__}" for fn in constructors}
    return frozenset(out)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def reference_rule(reference: str, shipped: Collection[str], allowed: Collection[str],
                   zoo: Collection[str]) -> str | None:
    """The rule a ``package.module:function`` reference breaks, or None when it may run.

    A pure function of strings: nothing is imported.

    Args:
        reference: the reference as the spec gives it (its syntax already checked).
        shipped: the top-level modules of the job's shipped code (`shipped_modules`).
        allowed: the prefixes the coordinator allows.
        zoo: the zoo's references (`zoo_references`).

    Returns:
        The broken rule (for a `FieldError`), or None.

    Example:
        >>> reference_rule("mylab.nets:build", set(), {"mylab"}, set()) is None
        True
        >>> reference_rule("mylabx:build", set(), {"mylab"}, set())[:40]
        'must name the job's shipped code (none),'
    """
    module = reference.partition(":")[0]
    if reference in zoo or module.split(".")[0] in shipped:
        return None
    if any(_under(module, prefix) for prefix in allowed):
        return None
    return (f"must name the job's shipped code ({', '.join(sorted(shipped)) or 'none'}), a "
            f"model of the zoo, or a module under a prefix this coordinator allows "
            f"({', '.join(sorted(allowed)) or 'none'}); {ALLOW_HOW}")


def reference_fields(spec: JobSpec) -> Iterator[tuple[str, str]]:
    """Every ``package.module:function`` reference of a spec, as ``(field, reference)``."""
    if spec.model is not None and ":" in spec.model.name:
        yield "model.name", spec.model.name
    if spec.dataset is not None and ":" in spec.dataset.name:
        yield "dataset.name", spec.dataset.name
    if spec.loss is not None:
        yield "loss", spec.loss


def _script(entrypoint: str) -> str:
    return os.path.normpath(shlex.split(entrypoint)[0]).replace(os.sep, "/")


def spec_code_errors(spec: JobSpec, files: Collection[str] | None,
                     allowed: Collection[str]) -> list[FieldError]:
    """Every reference (and entrypoint) of a validated spec that the rule refuses.

    Args:
        spec: the validated spec.
        files: the file names of its shipped code (the archive's listing); None: it ships none.
        allowed: the prefixes the coordinator allows.

    Returns:
        One `FieldError` per refused field, naming the field, the rule and the value.
    """
    shipped = shipped_modules(files or ())
    zoo = zoo_references()
    errors = [FieldError(field, rule, value) for field, value in reference_fields(spec)
              if (rule := reference_rule(value, shipped, allowed, zoo)) is not None]
    # Archives made by other tools name their members ./train.py: compared as paths, not text.
    names = {PurePosixPath(name).as_posix() for name in files or ()}
    if spec.entrypoint is not None and (files is None or _script(spec.entrypoint) not in names):
        errors.append(FieldError("entrypoint", "must name a script of the job's shipped code "
                                 "(code: DIR ships the directory)", spec.entrypoint))
    return errors


def allowed_from_environment(environ: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The prefixes a coordinator handed this rank (`ALLOWED_MODULES`); None when unset.

    Raises:
        JobSpecError: a prefix that is not dotted identifiers (naming the variable).
    """
    environ = os.environ if environ is None else environ
    text = environ.get(ALLOWED_MODULES)
    if text is None:
        return None
    prefixes = tuple(p for p in text.split(",") if p)
    for prefix in prefixes:
        if not _dotted(prefix):
            raise JobSpecError([FieldError(ALLOWED_MODULES, "must be comma-separated module "
                                           "prefixes", text)])
    return prefixes


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _code_files(code_dir: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(code_dir):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(root, code_dir)
        out += [PurePosixPath(*(() if rel == "." else PurePosixPath(rel).parts), n).as_posix()
                for n in names]
    return out


def check_job_code(spec: JobSpec, code_dir: str,
                   environ: Mapping[str, str] | None = None) -> None:
    """A rank's own check, before it imports anything the job names: the coordinator's rule
    again (its prefixes as this launch gives them), and that every shipped reference and the
    entrypoint really resolve inside the code directory.

    Args:
        spec: the job.
        code_dir: the job's code directory (already first on ``sys.path``).
        environ: the environment (default ``os.environ``); without `ALLOWED_MODULES` (``dptrain
            run``) nothing is checked.

    Raises:
        JobSpecError: naming every refused field.
    """
    allowed = allowed_from_environment(environ)
    if allowed is None:
        return
    code_dir = os.path.realpath(code_dir)
    files = _code_files(code_dir) if spec.code is not None else None
    errors = spec_code_errors(spec, files, allowed)
    shipped = shipped_modules(files or ())
    for field, value in reference_fields(spec):
        top = value.partition(":")[0].split(".")[0]
        if top not in shipped or any(e.path == field for e in errors):
            continue
        try:
            found = importlib.util.find_spec(top)  # a top-level name: finds, runs nothing
        except (ImportError, ValueError):  # e.g. a loaded module without a __spec__
            found = None
        where = [found.origin] if found and found.origin else []
        where += list(found.submodule_search_locations or []) if found else []
        if not where or not all(_inside(os.path.realpath(p), code_dir) for p in where):
            errors.append(FieldError(field, f"must resolve inside the job's code ({code_dir}), "
                                     f"but {top!r} is found at {', '.join(where) or 'nowhere'}",
                                     value))
    if spec.entrypoint is not None and not any(e.path == "entrypoint" for e in errors):
        script = os.path.realpath(os.path.join(code_dir, shlex.split(spec.entrypoint)[0]))
        if not _inside(script, code_dir):
            errors.append(FieldError("entrypoint", f"must lie inside the job's code "
                                     f"({code_dir})", spec.entrypoint))
    if errors:
        raise JobSpecError(errors)
