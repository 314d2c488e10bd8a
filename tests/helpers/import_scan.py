"""What a module's source imports, read from its syntax tree: every ``import`` statement at any
depth (inside functions too), so a lazy import cannot hide an arrow the layers forbid."""

from __future__ import annotations

import ast


def imported_modules(source: str, package: str = "") -> list[tuple[int, str]]:
    """Every module an ``import`` statement of `source` names, resolved to its absolute name.

    ``from a.b import c`` names both ``a.b`` and ``a.b.c`` (``c`` may be a submodule).

    Args:
        source: a module's source text.
        package: the package the module is in, to resolve relative imports (``from .. import x``).

    Returns:
        ``(line, module name)`` pairs in the order of the tree walk.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package upwards
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}")
                                               for a in node.names]
    return found
