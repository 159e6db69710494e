"""Which compressed candidate ships: accuracy, size and latency together (`compress.select`).

A candidate is *eligible* when, against the parent (the uncompressed model):
  - its task metric drops at most `max_task_drop_points` (accuracy-like) or rises at most
    `max_task_rise_pct` % (loss-like), and every *general* metric stays within the gate's limits
    (`gate.general_max_drop_points`, `gate.perplexity_max_rise_pct`);
  - its tokens/s (`speed_by`: batch 1 or the batched figure) is at least `min_speed_ratio` × the
    parent's — 1.0 by default, so a compressed model that generates slower than its parent never ships
    unless the user says so;
  - its memory footprint is at most `max_memory_mb` (when set) and its size no larger than the parent's;
  - its folder reloads the way it was measured (`reloadable`: an HF folder the registry and the gate
    load with `from_pretrained`; a recipe folder such as dynamic int8 is measured but cannot ship).
Among the eligible, `objective` decides: `smallest` (size_by), `fastest` (speed_by), or `pareto`
(on the size × speed Pareto front, the best `size_weight·log(size ratio) + speed_weight·log(speed ratio)`).
Ties go to the better task metric. The result names the winner, why it won and the runner-up.
"""

from __future__ import annotations

import math
from typing import Any

from stagewise.config import Config
from stagewise.metrics import metric as metric_info


def lower_is_better(metric: str) -> bool:
    return not metric_info(metric).higher_is_better


def _scored(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k.lower()]


def _delta(metric: str, parent: float, cand: float) -> tuple[str, float]:
    """('rise_pct', x) for loss-like metrics; ('drop_points', x) on the 0-100 scale for accuracy-like."""
    info = metric_info(metric)
    if info.relative:
        return "rise_pct", (cand - parent) / abs(parent) * 100 if parent else math.inf
    scale = 100.0 if info.kind == "accuracy" else 1.0
    return "drop_points", (parent - cand) * scale


def task_metric_of(cfg: Config, parent_metrics: dict) -> str | None:
    names = _scored(parent_metrics)
    return cfg.compress.select.task_metric or next((k for k in names if "general" not in k.lower()), None)


def check(cfg: Config, parent_metrics: dict, metrics: dict) -> dict:
    """Accuracy: per-metric deltas vs the parent; passes the task limit and the forgetting guard?"""
    sel, gate = cfg.compress.select, cfg.gate
    task_metric = task_metric_of(cfg, parent_metrics)
    general = [k for k in _scored(parent_metrics) if "general" in k.lower()]
    out: dict[str, Any] = {"task_metric": task_metric, "deltas": {}, "failed": []}
    for m in ([task_metric] if task_metric else []) + general:
        if m not in metrics or not isinstance(metrics[m], (int, float)):
            out["failed"].append(f"{m}: not evaluated")
            continue
        kind, d = _delta(m, parent_metrics[m], metrics[m])
        d = round(d, 6)  # (0.17 - 0.15) * 100 is 2.0000000000000018: a 2-point drop must pass a 2-point limit
        out["deltas"][m] = {kind: round(d, 3)}
        if m == task_metric:
            limit = sel.max_task_rise_pct if kind == "rise_pct" else sel.max_task_drop_points
        else:
            limit = gate.perplexity_max_rise_pct if kind == "rise_pct" else gate.general_max_drop_points
        if d > limit:
            out["failed"].append(f"{m}: {kind.replace('_', ' ')} {d:.2f} > {limit}")
    if task_metric is None:
        out["failed"].append("no task metric (set compress.select.task_metric)")
    out["passed"] = not out["failed"]
    return out


def speed_ratio(cfg: Config, parent: dict, cand: dict) -> float | None:
    key = cfg.compress.select.speed_by
    if not isinstance(cand.get(key), (int, float)) or not parent.get(key):
        return None
    return cand[key] / parent[key]


def constraints(cfg: Config, parent: dict, cand: dict) -> list[str]:
    """Size, latency and reload constraints a candidate fails (accuracy is `check`)."""
    sel = cfg.compress.select
    failed = []
    if cand.get("reloadable") is False:
        failed.append(f"not shippable: {cand.get('reload_error') or 'its folder does not reload as measured'}")
    ratio = speed_ratio(cfg, parent, cand)
    if ratio is None:
        failed.append(f"{sel.speed_by} not measured")
    elif ratio < sel.min_speed_ratio - 1e-9:
        failed.append(f"{sel.speed_by} {ratio:.2f}x the parent < {sel.min_speed_ratio:g}x (compress.select.min_speed_ratio)")
    if sel.max_memory_mb is not None and cand.get("memory_bytes", math.inf) / 1e6 > sel.max_memory_mb:
        failed.append(f"memory {cand['memory_bytes'] / 1e6:.2f} MB > {sel.max_memory_mb:g} MB (compress.select.max_memory_mb)")
    if cand.get(sel.size_by, math.inf) > parent.get(sel.size_by, math.inf):
        failed.append(f"larger than the parent by {sel.size_by}")
    return failed


def pareto_front(rows: list[dict], size_by: str, speed_by: str) -> list[str]:
    """Methods no other row beats on both size (smaller) and speed (faster); the parent may be one."""
    pts = [(r["method"], r.get(size_by), r.get(speed_by)) for r in rows
           if isinstance(r.get(size_by), (int, float)) and isinstance(r.get(speed_by), (int, float))]
    return [m for m, s, v in pts
            if not any(s2 <= s and v2 >= v and (s2, v2) != (s, v) for _, s2, v2 in pts)]


def select(cfg: Config, parent: dict, candidates: list[dict], task_metric: str | None = None) -> dict:
    """Rank the eligible candidates by the objective. Returns {chosen, runner_up, ranking, front, reason}.

    Every candidate gets `eligible` and `failed` (its accuracy `check` failures, then the constraints).
    `task_metric`: the metric ties and reasons read — the gate's target (default: `task_metric_of`).
    """
    sel = cfg.compress.select
    size_by, speed_by = sel.size_by, sel.speed_by
    for c in candidates:
        failed = list(c.get("check", {}).get("failed", [])) if "error" not in c else [c["error"]]
        if "error" not in c and not c.get("check"):
            failed.append("not evaluated")
        if "error" not in c:
            failed += constraints(cfg, parent, c)
        c["failed"] = failed
        c["eligible"] = not failed
    measured = [c for c in candidates if "error" not in c]
    front = pareto_front([parent] + measured, size_by, speed_by)
    ok = [c for c in measured if c["eligible"]]
    tm = task_metric or task_metric_of(cfg, parent.get("metrics", {}))

    def quality(c):  # larger is better, for ties
        v = c.get("metrics", {}).get(tm)
        return 0.0 if v is None else (-v if lower_is_better(tm) else v)

    def score(c):
        size_ratio = parent[size_by] / max(c[size_by], 1)
        return sel.size_weight * math.log(size_ratio) + sel.speed_weight * math.log(max(speed_ratio(cfg, parent, c), 1e-9))

    if sel.objective == "smallest":
        ranking = sorted(ok, key=lambda c: (c[size_by], -c[speed_by], -quality(c)))
    elif sel.objective == "fastest":
        ranking = sorted(ok, key=lambda c: (-c[speed_by], c[size_by], -quality(c)))
    else:  # pareto: dominated candidates never win; among the front, the weighted log-ratio score
        ranking = sorted(ok, key=lambda c: (c["method"] not in front, -score(c), -quality(c)))
    names = [c["method"] for c in ranking]
    out = {"chosen": names[0] if names else None, "runner_up": names[1] if len(names) > 1 else None,
           "ranking": names, "front": front, "objective": sel.objective}
    if not ranking:
        why = "; ".join(f"{c['method']}: {', '.join(c['failed'])}" for c in candidates)
        out["reason"] = f"no candidate within limits — the uncompressed parent ships ({why})"
        return out

    def describe(c):
        mem = parent[size_by] / max(c[size_by], 1)
        val = c.get("metrics", {}).get(tm)
        return (f"{size_by} {mem:.2f}x smaller, {speed_ratio(cfg, parent, c):.2f}x the parent's {speed_by}, "
                f"{tm} {val if val is None else round(val, 4)} vs {parent.get('metrics', {}).get(tm)}")

    best = ranking[0]
    won = {"smallest": f"smallest by {size_by} among the eligible",
           "fastest": f"fastest by {speed_by} among the eligible",
           "pareto": (f"best weighted score on the size × speed Pareto front "
                      f"({sel.size_weight:g}·log size ratio + {sel.speed_weight:g}·log speed ratio = {score(best):.3f})")}
    reason = f"{best['method']} won: {won[sel.objective]} ({describe(best)})"
    if len(ranking) > 1:
        reason += f"; runner-up {ranking[1]['method']} ({describe(ranking[1])})"
    else:
        others = [c for c in candidates if c is not best]
        reason += "; no runner-up" + (" — " + "; ".join(f"{c['method']}: {c['failed'][0]}" for c in others if c["failed"])
                                      if others else "")
    out["reason"] = reason
    return out
