"""The data steps with their inputs, in one table: used by the flow and by `stagewise step NAME`
(which is what `dvc repro` runs), so both execute exactly the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stagewise.config import Config
from stagewise.workspace import Workspace


def data_steps(cfg: Config, ws: Workspace) -> dict[str, tuple[Any, dict[str, Any]]]:
    """step name → (Prefect task, keyword arguments). `task.fn(**kwargs)` runs it without Prefect."""
    from stagewise.evalsets import plan
    from tasks import decontaminate, dedup, generate, ingest, quality, tokenizer, validate

    evals = plan(cfg, ws.root)
    # Every declared (or demo) eval set is a decontamination reference; sorted like the folder glob it replaces.
    references = sorted({Path(s["path"]) for s in evals.sets.values() if s["origin"] != "heldout"})
    heldout = {"kinds": evals.heldout_kinds(), "share": cfg.evaluate.holdout_share, "max": cfg.evaluate.holdout_max}

    return {
        "generate": (generate.generate_task, dict(cfg=cfg.generate, out_dir=ws.raw)),
        "ingest": (ingest.ingest_task, dict(data_cfg=cfg.data, cfg=cfg.ingest, raw_dir=ws.raw, out_dir=ws.ingested,
                                                root=ws.root)),
        "quality": (quality.quality_task, dict(cfg=cfg.quality, in_dir=ws.ingested, out_dir=ws.filtered)),
        "dedup": (dedup.dedup_task, dict(cfg=cfg.dedup, in_dir=ws.filtered, out_dir=ws.deduped)),
        "decontaminate": (decontaminate.decontaminate_task,
                          dict(cfg=cfg.decontaminate, in_dir=ws.deduped, benchmarks_dir=references,
                               out_dir=ws.curated, heldout=heldout)),
        "validate": (validate.validate_task, dict(cfg=cfg.validate_, in_dir=ws.curated, out_dir=ws.validated)),
        "tokenizer": (tokenizer.tokenizer_task, dict(cfg=cfg.tokenizer, curated_dir=ws.curated, out_dir=ws.tokenizer)),
    }


def metrics_path(ws: Workspace, step: str):
    return ws.root / "metrics" / f"{step}.json"
