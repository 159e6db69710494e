"""gate — the forgetting guard: which model may replace the champion?

The rules themselves live in the one rulebook, stagewise/rulebook.py (target improves; compression cost
within its limit; every general metric within its limit vs the parent, the fine-tuning base, the
uncompressed model and the champion; earlier stages' and the champion's targets kept), with bootstrap
CIs on every delta. This step applies them candidate by candidate in the fallback order — the
compressor's choice, its runner-up, the uncompressed model, each earlier accepted stage model — and
moves `champion` to the first that passes every rule (docs/evaluation.md#one-rulebook).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from stagewise import registry
from stagewise.config import Config
from stagewise.evaluation import evaluate
from stagewise.hashing import dir_hash
from stagewise.rulebook import GateResult, Guard, Rulebook, bootstrap_delta_ci, gate, relative  # noqa: F401  (the rules)
from stagewise.stage import Lineage, RunContext, eval_tasks_dir, fine_tuning_base, stage_evals


# ---------------------------------------------------------------- promotion
def champion_stage(ctx: RunContext, version: str | None) -> str | None:
    """The training stage a champion version was made by (a compressed one: its uncompressed model's)."""
    if version is None:
        return None
    tags = registry.version_tags(ctx.registered_model, version)
    return tags.get("parent_stage") if tags.get("stage") == "compress" else tags.get("stage")


def champion_metrics(ctx: RunContext, cfg: Config, tasks: list[str], candidate_version: str | None) -> tuple[str | None, dict | None]:
    """Evaluate the current champion on the candidate's evals (None when there is none, or it is the candidate)."""
    version = registry.alias_version(ctx.registered_model, registry.CHAMPION)
    if version is None or version == candidate_version:
        return version, None
    folder = ctx.ws.model_dir("champion")
    want = registry.version_tags(ctx.registered_model, version).get("weights_hash")
    if not folder.exists() or dir_hash(folder, "*.safetensors") != want:
        registry.download_model(ctx.registered_model, version, folder)
    return version, evaluate(folder, tasks, ctx.ws, cfg.evaluate, tasks_dir=eval_tasks_dir(cfg, ctx.root))


def compressed_lineage(ctx: RunContext, cfg: Config, lineage: list[Lineage], shipped: dict) -> Lineage:
    """A registered compressed candidate, scored on the uncompressed model's evals (the compress step
    scored the same folder: evaluate()'s cache answers)."""
    folder = Path(shipped["model_dir"])
    want = registry.version_tags(ctx.registered_model, shipped["version"]).get("weights_hash")
    if not folder.exists() or dir_hash(folder, "*.safetensors") != want:
        registry.download_model(ctx.registered_model, shipped["version"], folder)
    uncompressed = lineage[-1]
    metrics = evaluate(folder, stage_evals(uncompressed.stage, cfg, ctx.root), ctx.ws, cfg.evaluate,
                       tasks_dir=eval_tasks_dir(cfg, ctx.root))
    return Lineage("compress", str(folder), shipped.get("cache_key", ""), shipped["version"], uncompressed.data_hash,
                   metrics, parent_metrics=uncompressed.metrics, weights_hash=want)


def shipped_lineage(ctx: RunContext, cfg: Config, lineage: list[Lineage], compression: dict | None) -> Lineage | None:
    """The compressed model the compress step chose (registered), or None."""
    shipped = (compression or {}).get("shipped")
    if not shipped or not shipped.get("version"):
        return None
    return compressed_lineage(ctx, cfg, lineage, shipped)


def fallback_order(ctx: RunContext, cfg: Config, lineage: list[Lineage],
                   compression: dict | None) -> list[tuple[Lineage, int, str | None]]:
    """The candidates the gate judges, best first: the compressor's choice, its runner-up, the uncompressed
    model, then each earlier accepted stage model. Each as (lineage, index of the trained model it is
    judged as, compression method or None)."""
    out: list[tuple[Lineage, int, str | None]] = []
    comp = compression or {}
    for c in [comp.get("shipped"), *(comp.get("fallbacks") or [])]:
        if c and c.get("version"):
            out.append((compressed_lineage(ctx, cfg, lineage, c), len(lineage) - 1, c["method"]))
    out += [(lineage[i], i, None) for i in range(len(lineage) - 1, 0, -1)]
    return out


def judge_candidate(ctx: RunContext, cfg: Config, lineage: list[Lineage], cand: Lineage, i: int,
                    compressed: bool) -> tuple[Any, dict, str | None]:
    """The rulebook on one candidate: judged as the trained model lineage[i] (its stage's target vs that
    model's parent; vs the uncompressed model when compressed; vs the base, the champion and the
    earlier stages' targets). Returns (GateResult, compared_with, champion version)."""
    from stagewise.evalsets import plan

    trained = lineage[i]
    evals = plan(cfg, ctx.root)
    book = Rulebook.of(cfg, evals)
    # The champion's skills are kept too: every target up to the stage that made it, vs the champion
    # (so a fallback to an earlier model cannot replace a chat champion with a model that never learnt chat).
    champ_now = registry.alias_version(ctx.registered_model, registry.CHAMPION)
    keep = book.champion_stages(champion_stage(ctx, champ_now), trained.stage) if champ_now != cand.version else []
    tasks = list(dict.fromkeys([*stage_evals(trained.stage, cfg, ctx.root), *(evals.targets[s].task for s in keep)]))
    metrics, missing = cand.metrics, [t for t in tasks if t not in cand.metrics]
    if missing:   # scored on what this candidate was not scored on yet (the champion's targets; cached per weights)
        metrics = {**evaluate(Path(cand.model_dir), missing, ctx.ws, cfg.evaluate,
                              tasks_dir=eval_tasks_dir(cfg, ctx.root)), **cand.metrics}
    champ_version, champ = champion_metrics(ctx, cfg, tasks, cand.version)
    guards = book.guards_for(trained.stage, lineage[1:i])
    if champ is not None:
        guards += [Guard(s, champ_version, champ, who=f"champion v{champ_version}") for s in keep]
    base = fine_tuning_base(lineage[: i + 1])
    result = book.judge(trained.stage, metrics, parent=trained.parent_metrics,
                        base=base[1] if base else None, champion=champ,
                        uncompressed=trained.metrics if compressed else None, guards=guards)
    compared = {"parent": lineage[i - 1].version or lineage[i - 1].stage,
                **({"uncompressed": trained.version} if compressed else {}),
                "champion": champ_version, "base": (base[0].version or base[0].stage) if base else None}
    return result, compared, champ_version


def gate_and_promote(ctx: RunContext, cfg: Config, lineage: list[Lineage],
                     shipped: Lineage | None = None, compression: str | None = None,
                     order: list[tuple[Lineage, int, str | None]] | None = None) -> dict[str, Any]:
    """Judge the candidates in the fallback order; the first that passes every rule is promoted.

    `order`: fallback_order(...); without it, `shipped` (a compressed candidate, `compression` its
    method) then the uncompressed model and the earlier stage models. Every candidate tried is listed
    (`tried`) with the rules it failed; `champion` moves only to one that passed every rule.
    """
    if order is None:
        order = ([(shipped, len(lineage) - 1, compression)] if shipped else []) + \
                [(lineage[i], i, None) for i in range(len(lineage) - 1, 0, -1)]
    name = ctx.registered_model
    tried, chosen = [], None
    for cand, i, method in order:
        result, compared, champ_version = judge_candidate(ctx, cfg, lineage, cand, i, method is not None)
        trained = lineage[i]
        info = {"stage": cand.stage, "version": cand.version}
        if method is not None:
            info |= {"compression": method, "uncompressed_version": trained.version, "evaluated_as": trained.stage}
        tried.append({"candidate": info, "passed": result.passed,
                      "enforced": sum(r["enforced"] for r in result.rules),
                      "failed": [r["metric"] + " vs " + r["against"] for r in result.failed()],
                      "reasons": result.reasons[: max(1, len(result.failed()))]})
        if cand.version and not result.passed:
            registry.client().set_model_version_tag(name, cand.version, "gate", "failed")
        if chosen is None:
            chosen = (cand, info, result, compared, champ_version)   # the report's rules: the first candidate's ...
        if result.passed:
            chosen = (cand, info, result, compared, champ_version)   # ... or those of the one that passed
            break
    cand, info, result, compared, champ_version = chosen
    registry.set_challenger(name, cand.version)
    moved = registry.promote(name, cand.version, result.passed)
    now = registry.alias_version(name, registry.CHAMPION)
    gate_dict = result.to_dict()
    gate_dict.update(candidate=info, compared_with=compared, tried=tried,
                     fallback=len(tried) > 1 and result.passed,
                     champion_moved=moved and now == cand.version and champ_version != cand.version)
    if len(tried) > 1:
        head = (f"the final candidate failed; promoted the next in the fallback order: "
                f"{_label(info)} (candidate {len(tried)} of {len(order)})" if result.passed else
                f"none of the {len(tried)} candidates passed every rule; the champion stays")
        gate_dict["reasons"] = [head, *(f"tried {_label(t['candidate'])}: {t['reasons'][0]}" for t in tried[:-1]),
                                *gate_dict["reasons"]]
    return {
        "gate": gate_dict,
        "champion": {"name": name, "version": now},
        "challenger": {"name": name, "version": cand.version},
    }


def _label(c: dict) -> str:
    what = f"{c['compression']} of {c['evaluated_as']}" if c.get("compression") else c["stage"]
    return f"v{c['version']} ({what})"


@task(name="gate", retries=0)
def gate_task(ctx, cfg, lineage, compression: dict | None = None) -> dict:
    """Forgetting guard on the model that ships (the compress step's choice, else the final trained
    model), then the registry aliases."""
    return gate_and_promote(ctx, cfg, lineage, order=fallback_order(ctx, cfg, lineage, compression))
