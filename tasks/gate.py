"""gate — the forgetting guard: may a candidate replace its parent / the champion?

Rules (params.yaml `gate:`):
  1. target_improves: the stage's own target metric (`<stage>.target`, stagewise/evalsets.py) beats the parent's.
  2. general_no_drop: no accuracy-like general metric drops more than `general_max_drop_points`
     (points on a 0-100 scale) vs each of `gate.against`: the parent, the base (where fine-tuning
     started: pretrain output or model.base, so that forgetting spread over several stages still
     adds up) and the champion, whichever exist.
  3. general_ppl_rise: no perplexity-like general metric rises more than `perplexity_max_rise_pct` %.
  4. task_within_limit (a compressed candidate only): against the uncompressed model it was made
     from, the stage's target may drop at most `compress.select.max_task_drop_points` (or rise at
     most `max_task_rise_pct` % when loss-like); rules 2-3 apply against the uncompressed model too.
     Rule 1 still compares with the training parent: the stage's gain must survive compression.

Every delta carries a bootstrap confidence interval from the per-item scores evaluate() keeps
(paired over the same benchmark items when both sides scored the same items), and each rule says
whether its verdict would flip somewhere inside that interval: a verdict that could flip is noise,
and the report says so instead of pretending to a precision the eval set does not have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from stagewise import registry
from stagewise.config import Config, GateConfig
from stagewise.evaluation import evaluate
from stagewise.metrics import metric as metric_info
from stagewise.hashing import dir_hash
from stagewise.stage import Lineage, RunContext, eval_tasks_dir, stage_evals

@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    # Enforced rules: {rule, metric, against, candidate, baseline, delta, unit, threshold,
    # ci_low, ci_high, passed, flips_within_ci, enforced}
    rules: list[dict]
    # Every other metric both sides were scored on, same fields, never enforced (context for readers).
    comparisons: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative(metric: str, higher_is_better: bool) -> bool:
    """Perplexity-like metrics are compared in % change, accuracy-like ones in points."""
    return metric_info(metric).relative or not higher_is_better


# ---------------------------------------------------------------- bootstrap
def _arrays(res: dict, metric: str):
    import numpy as np

    items = res.get("samples", {}).get(metric)
    if not items:
        return None, None
    ids = res.get("doc_ids") or list(range(len(items)))
    if metric_info(metric).ratio:
        arr = np.asarray(items, dtype=float).reshape(len(items), 2)
    else:
        arr = np.asarray(items, dtype=float).reshape(len(items), 1)
    return arr, list(ids)


def _agg(metric: str, arr, idx):
    """Aggregate over each bootstrap row of indices (vectorised version of evaluate.aggregate)."""
    import numpy as np

    if metric_info(metric).ratio:
        ll, cnt = arr[idx, 0].sum(-1), arr[idx, 1].sum(-1)
        return -ll / cnt / np.log(2) if metric == "bits_per_byte" else np.exp(-ll / cnt)
    return arr[idx, 0].mean(-1)


def _delta(metric: str, rel: bool, cand, base):
    return 100.0 * (cand / base - 1.0) if rel else 100.0 * (cand - base)


def bootstrap_delta_ci(metric: str, rel: bool, cand_res: dict, base_res: dict, iters: int,
                       confidence: float, seed: int = 0) -> tuple[float | None, float | None, bool]:
    """Percentile CI of the delta; paired over shared items when possible. Returns (lo, hi, paired)."""
    import numpy as np

    ca, cids = _arrays(cand_res, metric)
    ba, bids = _arrays(base_res, metric)
    if ca is None or ba is None or iters < 2:
        return None, None, False
    rng = np.random.default_rng(seed)
    paired = cids == bids
    if not paired and set(cids) & set(bids):
        # Same benchmark, different subsets (e.g. another limit): pair on the shared items.
        shared = sorted(set(cids) & set(bids))
        ca = ca[[cids.index(i) for i in shared]]
        ba = ba[[bids.index(i) for i in shared]]
        paired = True
    if paired:
        idx = rng.integers(0, len(ca), size=(iters, len(ca)))
        d = _delta(metric, rel, _agg(metric, ca, idx), _agg(metric, ba, idx))
    else:
        d = _delta(metric, rel, _agg(metric, ca, rng.integers(0, len(ca), size=(iters, len(ca)))),
                   _agg(metric, ba, rng.integers(0, len(ba), size=(iters, len(ba)))))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(d, [alpha, 1.0 - alpha])
    return float(lo), float(hi), paired


# ---------------------------------------------------------------- rules
EPS = 1e-9
def _compare(rule: str, task_name: str, metric: str, hib: bool, against: str, cand: dict, base: dict,
             threshold: float, kind: str, iters: int, confidence: float, enforced: bool,
             decide_on: str = "estimate") -> dict | None:
    """One rule row. kind: 'improve' (delta must beat 0), 'max_drop' (delta >= -thr), 'max_rise' (delta <= thr)."""
    if task_name not in base or metric not in base[task_name]:
        return None
    rel = relative(metric, hib)
    row: dict[str, Any] = {
        "rule": rule, "metric": f"{task_name}.{metric}", "against": against, "higher_is_better": hib,
        "unit": "%" if rel else "points", "enforced": enforced,
    }
    if task_name not in cand or metric not in cand[task_name]:
        return row | {"candidate": None, "baseline": base[task_name][metric], "delta": None, "threshold": threshold,
                      "ci_low": None, "ci_high": None, "paired": False, "passed": False, "flips_within_ci": None}
    c, b = float(cand[task_name][metric]), float(base[task_name][metric])
    delta = _delta(metric, rel, c, b)
    lo, hi, paired = bootstrap_delta_ci(metric, rel, cand[task_name], base[task_name], iters, confidence)

    # EPS: a drop of exactly the limit is within it ((0.96 - 0.99) * 100 is -3.0000000000000027)
    if kind == "improve":  # better means up for accuracy, down for perplexity
        ok = (lambda d: d > threshold + EPS) if hib else (lambda d: d < -threshold - EPS)
    elif kind == "max_drop":
        ok = lambda d: d >= -threshold - EPS  # noqa: E731
    else:
        ok = lambda d: d <= threshold + EPS  # noqa: E731
    passed = ok(delta)
    flips = None if lo is None else (ok(lo) != passed or ok(hi) != passed)
    if decide_on == "ci" and lo is not None:
        # Only act on evidence: the target must improve across the whole CI; a general metric fails
        # only when the whole CI is past its limit.
        passed = (ok(lo) and ok(hi)) if kind == "improve" else (ok(lo) or ok(hi))
    return row | {"candidate": c, "baseline": b, "delta": delta, "threshold": threshold, "ci_low": lo,
                  "ci_high": hi, "paired": paired, "passed": passed, "flips_within_ci": flips,
                  "decided_on": decide_on if lo is not None else "estimate"}


def _describe(r: dict) -> str:
    if r["candidate"] is None:
        return f"{r['metric']} was not evaluated on the candidate (it is needed to compare with the {r['against']})"
    u = r["unit"]
    d = f"{r['delta']:+.2f}{' points' if u == 'points' else '%'}"
    ci = "" if r["ci_low"] is None else f" (delta CI {r['ci_low']:+.2f}..{r['ci_high']:+.2f})"
    vals = f"{r['baseline']:.4g} → {r['candidate']:.4g}"
    if r["rule"] == "target_improves":
        if r.get("decided_on") == "ci" and (r["delta"] > 0) == r["higher_is_better"] and r["delta"] != 0:
            return (f"target {r['metric']} improvement over the {r['against']} is within noise: {vals}, {d}{ci} "
                    "(gate.decide_on=ci needs the whole CI to improve)")
        return f"target {r['metric']} did not improve over the {r['against']}: {vals}, {d}{ci}"
    if r["rule"] == "task_within_limit":
        if r["unit"] == "points":
            return (f"compression cost: target {r['metric']} dropped {-r['delta']:.2f} points{ci} vs the uncompressed "
                    f"model ({vals}); limit -{r['threshold']:g} points (compress.select.max_task_drop_points)")
        return (f"compression cost: target {r['metric']} rose {r['delta']:.1f}%{ci} vs the uncompressed model "
                f"({vals}); limit +{r['threshold']:g}% (compress.select.max_task_rise_pct)")
    if r["rule"] == "general_no_drop":
        d = f"{-r['delta']:.2f} points"
        return (f"forgetting: {r['metric']} dropped {d}{ci} vs the {r['against']} ({vals}); "
                f"limit -{r['threshold']:g} points")
    d = f"{r['delta']:.1f}%"
    return (f"forgetting: {r['metric']} rose {d}{ci} vs the {r['against']} ({vals}); "
            f"limit +{r['threshold']:g}%")


def gate(stage: str, candidate: dict, parent: dict | None, champion: dict | None, cfg: GateConfig,
         bootstrap_iters: int = 1000, seed: int = 0, base: dict | None = None, evals=None,
         uncompressed: dict | None = None, task_max_drop_points: float = 2.0,
         task_max_rise_pct: float = 5.0) -> GateResult:
    """Apply the forgetting guard to evaluate() results of a candidate, its parent, base and champion.

    `base`: the model fine-tuning started from, when it is not the parent itself (None otherwise).
    `evals`: the run's stagewise.evalsets.EvalPlan (targets, general metrics); None: the demo world's.
    `uncompressed`: when the candidate is a compressed model, the results of the model it was made
    from (rule 4, with the compress.select task limits); `parent` stays the training stage's parent.
    """
    from stagewise.evalsets import demo_plan

    evals = evals or demo_plan()
    rules: list[dict] = []
    notes: list[str] = []
    iters, conf = bootstrap_iters, cfg.confidence
    target = evals.targets.get(stage)

    if target is not None and parent is not None:
        t, m, hib = target.task, target.metric, target.higher_is_better
        row = _compare("target_improves", t, m, hib, "parent", candidate, parent, 0.0, "improve", iters, conf,
                       enforced=cfg.require_target_improvement, decide_on=cfg.decide_on)
        if row is None:
            notes.append(f"target {t}.{m} not evaluated on the parent: improvement not checked")
        else:
            rules.append(row)
    elif target is not None:
        notes.append(f"no parent: {stage} is the first model, so its target has nothing to improve on")
    else:
        notes.append(f"stage {stage!r} has no target metric of its own: only the forgetting guard applies")

    if uncompressed is not None and target is not None:
        t, m, hib = target.task, target.metric, target.higher_is_better
        rel = relative(m, hib)
        row = _compare("task_within_limit", t, m, hib, "uncompressed", candidate, uncompressed,
                       task_max_rise_pct if rel else task_max_drop_points, "max_drop" if hib else "max_rise",
                       iters, conf, enforced=True, decide_on=cfg.decide_on)
        if row is None:
            notes.append(f"target {t}.{m} not evaluated on the uncompressed model: compression cost not checked")
        else:
            rules.append(row)

    baselines = [(a, b) for a, b in (("parent", parent), ("base", base), ("champion", champion))
                 if a in cfg.against and b is not None]
    if uncompressed is not None:
        baselines.insert(1, ("uncompressed", uncompressed))
    for against, ref in baselines:
        for g in evals.general:
            t, m, hib = g.task, g.metric, g.higher_is_better
            if relative(m, hib):
                row = _compare("general_ppl_rise", t, m, hib, against, candidate, ref, cfg.perplexity_max_rise_pct,
                               "max_rise", iters, conf, enforced=True, decide_on=cfg.decide_on)
            else:
                row = _compare("general_no_drop", t, m, hib, against, candidate, ref, cfg.general_max_drop_points,
                               "max_drop", iters, conf, enforced=True, decide_on=cfg.decide_on)
            if row is None:
                notes.append(f"{t}.{m} not evaluated on the {against}: not compared")
            else:
                rules.append(row)
    if champion is None and "champion" in cfg.against:
        # None also when the candidate already is the champion (an unchanged re-run)
        notes.append("no other champion to compare with (none yet, or the candidate is the champion)")

    # Context: every other task/metric both sides were scored on (not enforced).
    enforced_keys = {(r["metric"], r["against"]) for r in rules}
    comparisons = []
    for against, ref in baselines:
        for t in sorted(set(candidate) & set(ref)):
            for m in sorted(k for k in candidate[t].get("samples", {}) if k in ref[t]):
                if (f"{t}.{m}", against) in enforced_keys:
                    continue
                hib = metric_info(m).higher_is_better
                row = _compare("compare", t, m, hib, against, candidate, ref, 0.0, "improve", iters, conf,
                               enforced=False)
                if row is not None:
                    comparisons.append(row)

    failed = [r for r in rules if r["enforced"] and not r["passed"]]
    passed = not failed
    reasons = [_describe(r) for r in failed]
    if passed:
        n = sum(r["enforced"] for r in rules)
        line = f"all {n} enforced rule(s) passed" if n else "no rule applied"
        target = next((r for r in rules if r["rule"] == "target_improves" and r["passed"]), None)
        if target is not None:
            line += (f": target {target['metric']} improved {target['baseline']:.4g} → {target['candidate']:.4g} "
                     f"({target['delta']:+.2f}{' points' if target['unit'] == 'points' else '%'})")
        if any(r["rule"] != "target_improves" for r in rules):
            line += "; no general metric fell beyond its limit"
        reasons.append(line)
    for r in rules:
        if r["flips_within_ci"]:
            reasons.append(f"not significant: the verdict on {r['metric']} vs the {r['against']} could flip within "
                           f"its {conf:.0%} CI ({r['ci_low']:+.2f}..{r['ci_high']:+.2f} {r['unit']})")
        if not r["enforced"] and not r["passed"]:
            reasons.append(f"not enforced (gate.require_target_improvement=false): {_describe(r)}")
    reasons += notes
    return GateResult(passed=passed, reasons=reasons, rules=rules, comparisons=comparisons)


# ---------------------------------------------------------------- promotion
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
    shipped = (compression or {}).get("shipped")
    if not shipped or not shipped.get("version"):
        return None
    folder = Path(shipped["model_dir"])
    want = registry.version_tags(ctx.registered_model, shipped["version"]).get("weights_hash")
    if not folder.exists() or dir_hash(folder, "*.safetensors") != want:
        registry.download_model(ctx.registered_model, shipped["version"], folder)
    uncompressed = lineage[-1]
    metrics = evaluate(folder, stage_evals(uncompressed.stage, cfg, ctx.root), ctx.ws, cfg.evaluate,
                       tasks_dir=eval_tasks_dir(cfg, ctx.root))
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
    from stagewise.evalsets import plan

    trained = lineage[-1]
    candidate = shipped or trained
    champ_version, champ = champion_metrics(ctx, cfg, stage_evals(trained.stage, cfg, ctx.root), candidate.version)
    base = fine_tuning_base(lineage)
    sel = cfg.compress.select
    result = gate(trained.stage, candidate.metrics, trained.parent_metrics, champ, cfg.gate,
                  bootstrap_iters=cfg.evaluate.bootstrap_iters, seed=cfg.run.seed,
                  base=base[1] if base else None, evals=plan(cfg, ctx.root),
                  uncompressed=trained.metrics if shipped else None,
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


@task(name="gate", retries=0)
def gate_task(ctx, cfg, lineage, compression: dict | None = None) -> dict:
    """Forgetting guard on the model that ships (the compress step's choice, else the final trained
    model), then the registry aliases."""
    shipped = shipped_lineage(ctx, cfg, lineage, compression)
    return gate_and_promote(ctx, cfg, lineage, shipped, compression=(compression or {}).get("chosen"))
