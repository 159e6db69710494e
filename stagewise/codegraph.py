"""The project's own import graph, read from the AST: the code a step's result depends on.

A step's code version is the hash of every project module it imports, directly or through others
(imports inside functions count: a lazy import is still a dependency). Computed, never listed by
hand: a helper moved to another module, or a new import, is covered on the next run. Third-party
code is pinned by requirements.lock and not hashed here.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stagewise", "tasks", "flows")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imports_of(module: str, source: str, exists) -> list[tuple[str, int]]:
    """Project modules that `module`'s source imports (absolute and relative), with the line of each.

    `exists(name)` says whether a dotted name is a project module; `from pkg import name` depends on
    `pkg.name` when that is a module, else on `pkg` itself.
    """
    is_pkg = source is not None and exists(module + ".__init__")
    pkg = module if is_pkg else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if exists(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for name in names:
            while name and not exists(name):
                name = name.rpartition(".")[0]
            if name and name != module and name.split(".")[0] in PACKAGES and (name, node.lineno) not in found:
                found.append((name, node.lineno))
    return found


def _deps(module: str, root: Path) -> tuple[str, ...]:
    path = module_file(module, root)
    if path is None:
        return ()

    def exists(name: str) -> bool:
        if name.endswith(".__init__"):
            return root.joinpath(*name[: -len(".__init__")].split("."), "__init__.py").is_file()
        return module_file(name, root) is not None

    return tuple(sorted({d for d, _ in imports_of(module, path.read_text(), exists)}))


def closure(module: str, root: Path = ROOT) -> list[str]:
    """`module` and every project module it reaches through imports, sorted."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen and module_file(m, root) is not None:
            seen.add(m)
            todo.extend(_deps(m, root))
    return sorted(seen)


def code_version(module: str, root: Path = ROOT) -> str:
    """Hash of the source of `module`'s import closure (names and bytes): a step's code identity."""
    h = hashlib.sha256()
    for m in closure(module, root):
        h.update(m.encode())
        h.update(module_file(m, root).read_bytes())
    return h.hexdigest()[:16]
