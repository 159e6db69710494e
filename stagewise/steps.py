"""What a step is: its name, kind, the params sections it reads, what it consumes and produces.

The registry itself (`tasks.STEPS`) lists the project's steps in pipeline order; the flow, the CLI,
`stagewise step`, dvc.yaml (tested against it) and the summary all read that one list. A step's cache
identity is computed from it: the sections it declares and the code its module imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from stagewise.codegraph import code_version
from stagewise.workspace import Workspace

KINDS = ("data", "train", "ship")


@dataclass(frozen=True)
class Step:
    name: str                      # = module tasks/<name>.py = dvc stage = params section = MLflow run = Prefect task
    kind: str                      # data | train | ship
    reads: tuple[str, ...]         # params sections its result depends on: cache key, lineage, dvc params
    inputs: tuple[str, ...] = ()   # Workspace attributes it reads (data steps: dvc deps)
    outputs: tuple[str, ...] = ()  # Workspace attributes it writes (data steps: dvc outs)
    # data steps: the keyword arguments of the step's function, from the config and the workspace
    args: Callable[[Any, Workspace], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"step {self.name}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    def code_version(self) -> str:
        """Hash of the step module's whole project import closure (stagewise/codegraph.py)."""
        return code_version(self.module)


def metrics_path(ws: Workspace, step: str):
    return ws.root / "metrics" / f"{step}.json"
