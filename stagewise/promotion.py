"""Gate the final candidate against its parent and the current champion, then move aliases.

`challenger` always points at the newest gated candidate; `champion` moves only on a pass
(the old champion keeps `previous-champion`).
"""

from __future__ import annotations

from typing import Any

from stagewise import registry
from stagewise.config import Config
from stagewise.hashing import dir_hash
from stagewise.stage import Lineage, RunContext, stage_evals


def champion_metrics(ctx: RunContext, cfg: Config, tasks: list[str], candidate_version: str | None) -> tuple[str | None, dict | None]:
    """Evaluate the current champion on the candidate's evals (None when there is none, or it is the candidate)."""
    from tasks.evaluate import evaluate

    version = registry.alias_version(ctx.registered_model, registry.CHAMPION)
    if version is None or version == candidate_version:
        return version, None
    folder = ctx.ws.model_dir("champion")
    want = registry.version_tags(ctx.registered_model, version).get("weights_hash")
    if not folder.exists() or dir_hash(folder, "*.safetensors") != want:
        registry.download_model(ctx.registered_model, version, folder)
    from stagewise.stage import eval_tasks_dir

    return version, evaluate(folder, tasks, ctx.ws, cfg.evaluate, tasks_dir=eval_tasks_dir(cfg, ctx.root))


def fine_tuning_base(lineage: list[Lineage]) -> tuple[Lineage, dict] | None:
    """The model fine-tuning started from (pretrain output, or model.base) and its general scores.

    None when that model is the candidate's parent (the parent rules already cover it) or the
    candidate itself. Its scores are those its first child's run measured on it as a parent: every
    stage's evals include all general evals, so they are on the same items as the candidate's.
    """
    stages = [x.stage for x in lineage]
    root = stages.index("pretrain") if "pretrain" in stages else 0
    if root >= len(lineage) - 2:
        return None
    return lineage[root], lineage[root + 1].parent_metrics


def gate_and_promote(ctx: RunContext, cfg: Config, lineage: list[Lineage]) -> dict[str, Any]:
    from tasks.gate import gate

    candidate = lineage[-1]
    from stagewise.evalsets import plan

    champ_version, champ = champion_metrics(ctx, cfg, stage_evals(candidate.stage, cfg, ctx.root), candidate.version)
    base = fine_tuning_base(lineage)
    result = gate(candidate.stage, candidate.metrics, candidate.parent_metrics, champ, cfg.gate,
                  bootstrap_iters=cfg.evaluate.bootstrap_iters, seed=cfg.run.seed,
                  base=base[1] if base else None, evals=plan(cfg, ctx.root))
    name = ctx.registered_model
    registry.set_challenger(name, candidate.version)
    moved = registry.promote(name, candidate.version, result.passed)
    now = registry.alias_version(name, registry.CHAMPION)
    gate_dict = result.to_dict()
    gate_dict.update(candidate={"stage": candidate.stage, "version": candidate.version},
                     compared_with={"parent": lineage[-2].version or lineage[-2].stage, "champion": champ_version,
                                    "base": (base[0].version or base[0].stage) if base else None},
                     champion_moved=moved and now == candidate.version and champ_version != candidate.version)
    return {
        "gate": gate_dict,
        "champion": {"name": name, "version": now},
        "challenger": {"name": name, "version": candidate.version},
    }
