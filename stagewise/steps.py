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
    # data steps: content hashes of inputs outside the data layers (user sources, declared eval sets),
    # `inputs.<name>` in params.resolved.yaml (stagewise/hashing.py:input_hashes): extra dvc params
    hashes: tuple[str, ...] = ()
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


def _present(path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def with_missing_upstream(steps: tuple[Step, ...], selected: list[str], ws: Workspace,
                          skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """`selected` plus every step that makes an input a selected step needs and that is missing on
    disk, transitively — what `dvc repro <stage>` would run first. Returns the steps (pipeline order)
    and one line per added step ("running tokenizer first: pretrain needs data/07_tokenizer (missing)").

    Missing, not stale: an input that exists is used as it is (`--stages` runs what you name; drop it,
    or `--force-stage`, to bring outdated inputs up to date). `skip`: steps that do not run in this
    configuration (`generate` when data.sources replaces the demo world, `pretrain` when model.base
    replaces pretraining): what they make, or need, is not needed.
    """
    maker = {out: s for s in steps for out in s.outputs}
    by_name = {s.name: s for s in steps}
    chosen, notes = set(selected), []
    todo = [n for n in selected if n in by_name]
    while todo:
        step = by_name[todo.pop(0)]
        # a training stage trains on its parent's model: the earlier stages (run when not cached) need theirs
        chain = steps[: steps.index(step) + 1] if step.kind == "train" else (step,)
        needs = [a for s in chain if s.kind == step.kind and s.name not in skip for a in s.inputs]
        for attr in dict.fromkeys(needs):
            path, producer = getattr(ws, attr), maker.get(attr)
            if producer is None or producer.name in skip or producer.name in chosen or _present(path):
                continue
            chosen.add(producer.name)
            todo.append(producer.name)
            notes.append(f"running {producer.name} first: {step.name} needs "
                         f"{path.relative_to(ws.root)} (missing)")
    return [s.name for s in steps if s.name in chosen] + [n for n in selected if n not in by_name], notes
