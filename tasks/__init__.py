"""The steps of the DAG, in pipeline order: the one registry of steps.

The flow wires these, the CLI validates `--stages` / `--force-stage` and runs `stagewise step NAME`
from them, tests check dvc.yaml and params.yaml against them, and each step's cache key is built
from its `reads` and its module's import closure. Adding a step = its module tasks/<name>.py, one
entry here, its params section, and (data steps) its dvc.yaml stage. docs/architecture.md.
"""

from __future__ import annotations

import importlib

from stagewise.evalsets import decontamination_inputs
from stagewise.steps import Step

STEPS: tuple[Step, ...] = (
    Step("generate", "data", reads=("generate",), outputs=("raw",),
         args=lambda cfg, ws: dict(cfg=cfg.generate, out_dir=ws.raw)),
    Step("ingest", "data", reads=("data", "ingest"), inputs=("raw",), outputs=("ingested",), hashes=("sources",),
         args=lambda cfg, ws: dict(data_cfg=cfg.data, cfg=cfg.ingest, raw_dir=ws.raw, out_dir=ws.ingested,
                                   root=ws.root)),
    Step("quality", "data", reads=("quality",), inputs=("ingested",), outputs=("filtered",),
         args=lambda cfg, ws: dict(cfg=cfg.quality, in_dir=ws.ingested, out_dir=ws.filtered, ops=_ops(cfg, ws))),
    Step("dedup", "data", reads=("dedup",), inputs=("filtered",), outputs=("deduped",),
         args=lambda cfg, ws: dict(cfg=cfg.dedup, in_dir=ws.filtered, out_dir=ws.deduped, ops=_ops(cfg, ws))),
    # every eval set the run scores on is a reference (stagewise/evalsets.py), held-out shares are cut here
    Step("decontaminate", "data", reads=("decontaminate",), inputs=("deduped", "raw"), outputs=("curated",),
         hashes=("eval_sets", "heldout"),
         args=lambda cfg, ws: dict(cfg=cfg.decontaminate, in_dir=ws.deduped, out_dir=ws.curated,
                                   **decontamination_inputs(cfg, ws.root))),
    # open-book chats from the curated rag records; SFT trains on them beside the curated chats
    Step("raft", "data", reads=("raft",), inputs=("curated",), outputs=("raft",),
         args=lambda cfg, ws: dict(cfg=cfg.raft, in_dir=ws.curated, out_dir=ws.raft, root=ws.root)),
    Step("validate", "data", reads=("validate",), inputs=("curated",), outputs=("validated",),
         args=lambda cfg, ws: dict(cfg=cfg.validate_, in_dir=ws.curated, out_dir=ws.validated)),
    Step("tokenizer", "data", reads=("tokenizer",), inputs=("curated",), outputs=("tokenizer",),
         args=lambda cfg, ws: dict(cfg=cfg.tokenizer, curated_dir=ws.curated, out_dir=ws.tokenizer)),
    Step("pretrain", "train", reads=("pretrain", "model", "train"), inputs=("curated", "tokenizer")),
    Step("sft", "train", reads=("sft", "model", "train"), inputs=("curated",)),
    # DPO with LoRA, and RLHF's reward model, reuse SFT's adapter settings (sft.lora); DPO's replay term
    # batches SFT chats (sft.max_length) and pretraining blocks (pretrain.seq_len), as reasoning's does
    Step("preference", "train", reads=("preference", "sft", "pretrain", "model", "train"), inputs=("curated",)),
    # the replay term batches SFT chats (sft.max_length) and pretraining blocks (pretrain.seq_len)
    Step("reasoning", "train", reads=("reasoning", "sft", "pretrain", "model", "train"), inputs=("curated",)),
    # candidates are checked against the gate's limits, on the gate's evaluations
    Step("compress", "ship", reads=("compress", "evaluate", "gate", "train")),
    # a compressed candidate's task may drop at most compress.select's limit vs its uncompressed model
    Step("gate", "ship", reads=("gate", "evaluate", "compress")),
)

BY_NAME = {s.name: s for s in STEPS}


def _ops(cfg, ws):
    """The sharded steps' ops, their Ray scratch folder defaulting to the workspace's."""
    return cfg.ops.model_copy(update={"ray_scratch": cfg.ops.ray_scratch or str(ws.shards)})


def step(name: str) -> Step:
    return BY_NAME[name]


def of_kind(kind: str) -> tuple[Step, ...]:
    return tuple(s for s in STEPS if s.kind == kind)


def prefect_task(name: str):
    """The step's Prefect task, `tasks.<name>.<name>_task` (imported on demand: `stagewise step` stays light)."""
    return getattr(importlib.import_module(f"tasks.{name}"), f"{name}_task")
