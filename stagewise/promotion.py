"""Gate the final candidate (the shipped compressed model, or the uncompressed one) against its
parent, the uncompressed model, the base and the current champion, then move aliases.

`challenger` always points at the newest gated candidate; `champion` moves only on a pass
(the old champion keeps `previous-champion`).
"""

from __future__ import annotations

from pathlib import Path
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
    return version, evaluate(folder, tasks, ctx.ws, cfg.evaluate)


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


def shipped_lineage(ctx: RunContext, cfg: Config, lineage: list[Lineage], compression: dict | None) -> Lineage | None:
    """The registered compressed model the compress step chose, scored on the uncompressed model's
    evals (the compress step scored the same folder: evaluate()'s cache answers), or None."""
    from tasks.evaluate import evaluate

    shipped = (compression or {}).get("shipped")
    if not shipped or not shipped.get("version"):
        return None
    folder = Path(shipped["model_dir"])
    want = registry.version_tags(ctx.registered_model, shipped["version"]).get("weights_hash")
    if not folder.exists() or dir_hash(folder, "*.safetensors") != want:
        registry.download_model(ctx.registered_model, shipped["version"], folder)
    uncompressed = lineage[-1]
    metrics = evaluate(folder, stage_evals(uncompressed.stage), ctx.ws, cfg.evaluate)
    return Lineage("compress", str(folder), shipped.get("cache_key", ""), shipped["version"], uncompressed.data_hash,
                   metrics, parent_metrics=uncompressed.metrics, weights_hash=want)


def gate_and_promote(ctx: RunContext, cfg: Config, lineage: list[Lineage],
                     shipped: Lineage | None = None, compression: str | None = None) -> dict[str, Any]:
    """Gate the final candidate and move the aliases.

    The candidate is `shipped` (the compressed model chosen by the compress step) when there is one:
    it is judged on the uncompressed model's stage target against the training parent, against the
    uncompressed model (lineage[-1]: task within compress.select's limits, general guard), the base
    and the champion. Without it, the uncompressed model is the candidate, as it always was.
    """
    from tasks.gate import gate

    trained = lineage[-1]
    candidate = shipped or trained
    champ_version, champ = champion_metrics(ctx, cfg, stage_evals(trained.stage), candidate.version)
    base = fine_tuning_base(lineage)
    sel = cfg.compress.select
    result = gate(trained.stage, candidate.metrics, trained.parent_metrics, champ, cfg.gate,
                  bootstrap_iters=cfg.evaluate.bootstrap_iters, seed=cfg.run.seed,
                  base=base[1] if base else None, uncompressed=trained.metrics if shipped else None,
                  task_max_drop_points=sel.max_task_drop_points, task_max_rise_pct=sel.max_task_rise_pct)
    name = ctx.registered_model
    registry.set_challenger(name, candidate.version)
    moved = registry.promote(name, candidate.version, result.passed)
    now = registry.alias_version(name, registry.CHAMPION)
    gate_dict = result.to_dict()
    cand = {"stage": candidate.stage, "version": candidate.version}
    if shipped:
        cand |= {"compression": compression, "uncompressed_version": trained.version, "evaluated_as": trained.stage}
    gate_dict.update(candidate=cand,
                     compared_with={"parent": lineage[-2].version or lineage[-2].stage,
                                    **({"uncompressed": trained.version} if shipped else {}),
                                    "champion": champ_version,
                                    "base": (base[0].version or base[0].stage) if base else None},
                     champion_moved=moved and now == candidate.version and champ_version != candidate.version)
    return {
        "gate": gate_dict,
        "champion": {"name": name, "version": now},
        "challenger": {"name": name, "version": candidate.version},
    }
