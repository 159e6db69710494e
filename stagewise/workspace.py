"""Where every step reads and writes, relative to the workspace root (the folder with params.yaml).

Numbered data layers (Kedro-style) are DVC stage outputs; models live under `models/` and in MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KINDS = ("corpus", "chat", "preference", "verifiable", "rag")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> "Workspace":
        return cls(Path(root).resolve())

    # data layers (DVC-tracked)
    @property
    def raw(self) -> Path:          # generate / user drop zone
        return self.root / "data" / "01_raw"

    @property
    def benchmarks(self) -> Path:   # eval sets behind evals/*.yaml (and decontamination's reference)
        return self.root / "data" / "01_raw" / "benchmarks"

    @property
    def ingested(self) -> Path:
        return self.root / "data" / "02_ingested"

    @property
    def filtered(self) -> Path:     # quality
        return self.root / "data" / "03_filtered"

    @property
    def deduped(self) -> Path:
        return self.root / "data" / "04_deduped"

    @property
    def curated(self) -> Path:      # decontaminate → what training reads
        return self.root / "data" / "05_curated"

    @property
    def raft(self) -> Path:         # raft → open-book chats SFT trains on beside the curated ones
        return self.root / "data" / "05_raft"

    @property
    def validated(self) -> Path:    # GX results + Data Docs
        return self.root / "data" / "06_validated"

    @property
    def tokenizer(self) -> Path:
        return self.root / "data" / "07_tokenizer"

    # models, reports, stores (git-ignored)
    def model_dir(self, stage: str) -> Path:
        return self.root / "models" / stage

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def shards(self) -> Path:  # a sharded step's tasks' inputs and outputs on Ray (ops.ray_scratch)
        return self.root / ".stagewise" / "shards"

    @property
    def resolved_params(self) -> Path:  # the run's resolved config; dvc.yaml reads params from it
        return self.root / "params.resolved.yaml"


def checkpoint_dir(out_dir: Path) -> Path:
    """Where a stage writing `out_dir` keeps its trainer's checkpoints: beside it, so publishing the
    folder never carries them (and a killed run's are found again: stagewise/modeling.py)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.checkpoints"
