"""The import graph keeps its shape: CLI → flows → tasks → core (stagewise/), and no cycles.

Read from the AST of every project module, imports inside functions included (a lazy import is
still a dependency: it is how the old cycles hid). The checker is a pure function so the test can
also show it catching a planted violation.
"""

from __future__ import annotations

from pathlib import Path

from stagewise.codegraph import PACKAGES, imports_of

ROOT = Path(__file__).resolve().parents[1]


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def layer(module: str) -> str:
    top, _, rest = module.partition(".")
    if top == "stagewise" and (rest == "cli" or rest.startswith("cli_") or rest.startswith("cli.")):
        return "cli"
    return {"stagewise": "core", "tasks": "tasks", "flows": "flows"}[top]


# which layers a layer may import
ALLOWED = {"cli": {"cli", "flows", "tasks", "core"}, "flows": {"flows", "tasks", "core"},
           "tasks": {"tasks", "core"}, "core": {"core"}}


def graph(sources: dict[str, str]) -> dict[str, list[tuple[str, int]]]:
    """module → the project modules it imports, from the AST (the same reader as the cache keys')."""
    known = set(sources)
    packages = {m for m, p in project_modules().items() if p.name == "__init__.py"}

    def exists(name: str) -> bool:
        return name[: -len(".__init__")] in packages if name.endswith(".__init__") else name in known

    return {m: imports_of(m, src, exists) for m, src in sources.items()}


def violations(g: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Upward imports, task-to-task imports, and import cycles, as readable lines."""
    out = []
    for m, deps in g.items():
        for d, line in deps:
            if d in PACKAGES and d != "tasks":   # an empty package __init__: no layer of its own
                continue
            if layer(d) not in ALLOWED[layer(m)]:
                out.append(f"{m}:{line} imports {d} ({layer(m)} must not import {layer(d)})")
            elif layer(m) == layer(d) == "tasks" and d != "tasks":   # the registry (tasks/__init__) is shared
                out.append(f"{m}:{line} imports {d} (a step does not import another step: move the shared code to the core)")
    # cycles: depth-first search over the module graph
    edges = {m: sorted({d for d, _ in deps if d in g and d not in PACKAGES}) for m, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    seen_cycles = set()

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                key = frozenset(cyc)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    out.append("import cycle: " + " → ".join(cyc))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return out


def project_graph() -> dict[str, list[tuple[str, int]]]:
    return graph({m: p.read_text() for m, p in project_modules().items()})


def test_imports_run_one_way_and_have_no_cycles():
    assert violations(project_graph()) == []


def test_the_checker_catches_a_planted_upward_import_and_a_cycle():
    sources = {m: p.read_text() for m, p in project_modules().items()}
    sources["stagewise.config"] += "\ndef _planted():\n    from tasks.sft import sft\n"
    sources["stagewise.hashing"] += "\nimport stagewise.workspace\n"
    sources["stagewise.workspace"] += "\nimport stagewise.hashing\n"
    found = violations(graph(sources))
    assert any(v.startswith("stagewise.config:") and "imports tasks.sft (core must not import tasks)" in v
               for v in found), found
    assert any(v.startswith("import cycle:") and "stagewise.hashing" in v and "stagewise.workspace" in v
               for v in found), found


def test_the_checker_sees_a_step_importing_another_step():
    sources = {m: p.read_text() for m, p in project_modules().items()}
    sources["tasks.reasoning"] += "\nfrom tasks.sft import sft\n"
    assert any(v.startswith("tasks.reasoning:") and "imports tasks.sft (a step does not import another step"
               in v for v in violations(graph(sources)))


def test_the_registry_matches_the_config_and_dvc_yaml():
    """One list of steps: every step has its params section and its declared sections exist; the
    default `run.stages` is the registry's order; each data step is a dvc stage reading exactly its
    declared sections, with its declared inputs as deps and outputs as outs."""
    import yaml

    import tasks
    from stagewise.config import Config
    from stagewise.workspace import Workspace

    cfg = Config()
    names = [s.name for s in tasks.STEPS]
    assert cfg.run.stages == names
    for s in tasks.STEPS:
        assert s.name in s.reads, s.name
        for sec in s.reads:
            cfg.section(sec)          # raises AttributeError for a section that does not exist
        assert tasks.prefect_task(s.name).name == s.name
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    data = [s for s in tasks.STEPS if s.kind == "data"]
    assert list(dvc) == [s.name for s in data]
    ws = Workspace.at(".")
    rel = lambda attr: str(getattr(ws, attr).resolve().relative_to(Path(".").resolve()))  # noqa: E731
    for s in data:
        stage = dvc[s.name]
        assert stage["cmd"] == f"stagewise step {s.name}"
        assert stage["params"] == [{"params.resolved.yaml": list(s.reads)}], s.name
        assert sorted(stage.get("deps", [])) == sorted(rel(a) for a in s.inputs), s.name
        assert [o for o in stage["outs"]] == [rel(a) for a in s.outputs], s.name
