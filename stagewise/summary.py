"""The run summary: `reports/<run_id>/summary.json` (schema in docs/summary.md) and its table."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from stagewise.rulebook import ci_text
from stagewise.stage import RunContext


def curation_funnel(stats: dict[str, dict]) -> list[dict]:
    """input → kept per data step and record kind, from each step's stats.json."""
    funnel = []
    for step in ("ingest", "quality", "dedup", "decontaminate"):
        s = stats.get(step) or {}
        for kind, n_in in (s.get("input") or {}).items():
            funnel.append({"step": step, "kind": kind, "input": n_in, "kept": (s.get("kept") or {}).get(kind)})
    return funnel


def removed_counts(stats: dict[str, dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for step in ("ingest", "quality", "dedup", "decontaminate"):
        for reason, n in ((stats.get(step) or {}).get("removed") or {}).items():
            if isinstance(n, (int, float)):
                out[reason] = out.get(reason, 0) + int(n)
            elif isinstance(n, list):
                out[reason] = out.get(reason, 0) + len(n)
    return out


# Removals that are the pipeline's own doing, not a filter's verdict on the data.
_PLANNED = {"heldout_eval"}


def removal_warnings(stats: dict[str, dict], max_share: float) -> list[dict]:
    """Data steps that removed more than `max_share` of a kind's records, with their top three reasons.

    A filter tuned on other data can eat most of a user's corpus without failing anything; this makes
    it loud (log, summary, gate report) instead of leaving it to a stats.json nobody opens.
    """
    out = []
    for step in ("ingest", "quality", "dedup", "decontaminate"):
        s = stats.get(step) or {}
        for kind, n_in in (s.get("input") or {}).items():
            reasons = {r: n for r, n in ((s.get("removed_by_kind") or {}).get(kind) or {}).items() if r not in _PLANNED}
            removed = sum(reasons.values())
            if n_in and removed / n_in > max_share:
                top = sorted(reasons.items(), key=lambda x: (-x[1], x[0]))[:3]
                out.append({"step": step, "kind": kind, "input": n_in, "removed": removed,
                            "share": round(removed / n_in, 4), "top_reasons": [{"reason": r, "n": n} for r, n in top],
                            "message": (f"{step} removed {removed} of {n_in} {kind} records ({removed / n_in:.0%}, "
                                        f"more than data.warn_removed_share={max_share:g}); top reasons: "
                                        + ", ".join(f"{r} {n}" for r, n in top)
                                        + " — see data/*/removed/ and docs/data.md")})
    return out


def build_summary(ctx: RunContext, profile: str | None, data: dict, trained: dict, verdict: dict | None,
                  compression: dict | None, seconds: float) -> dict[str, Any]:
    from stagewise.run import _prefect_flow_run_id

    stats = data.get("stats", {})
    decon = stats.get("decontaminate") or {}
    rows = trained.get("rows", [])
    recipe = ctx.ws.reports / ctx.run_id / "recipe.json"   # what `auto` settings became (stagewise/run.py)
    return {
        "run_id": ctx.run_id,
        "profile": profile,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "code_version": ctx.code_version,
        "mlflow_run_id": ctx.mlflow_run_id,
        "prefect_flow_run_id": _prefect_flow_run_id(),
        "registered_model": ctx.registered_model,
        "data": {"cached": data.get("cached", []),
                 "ran": [step for step in stats if step not in data.get("cached", [])],
                 "hashes": data.get("hashes", {}),
                 "inputs": data.get("inputs", {}),
                 "warnings": data.get("warnings", [])},
        # Every set a number in this summary was measured on: path, kind, origin (declared | demo |
        # heldout), item count and content hash; `eval_notes` says what was resolved implicitly.
        "eval_sets": data.get("eval_sets", {}),
        "eval_notes": data.get("eval_notes", []),
        "curation": {
            "funnel": curation_funnel(stats),
            "removed": removed_counts(stats),
            "contaminated": [
                {"id": rid, "kind": kind, "benchmark_item": item}
                for kind, items in (decon.get("contaminated") or {}).items() for rid, item in items.items()
            ],
            **({"raft": raft_counts(stats["raft"])} if stats.get("raft") else {}),
        },
        "stages": rows,
        **({"recipe": json.loads(recipe.read_text())} if recipe.exists() else {}),
        "gate": (verdict or {}).get("gate", {"passed": None, "reasons": ["gate not run"]}),
        # without a gate in this run the champion is whatever the registry says (not "none")
        "champion": (verdict or {}).get("champion") or {"name": ctx.registered_model,
                                                         "version": _registry_champion(ctx.registered_model)},
        "challenger": (verdict or {}).get("challenger"),
        **({"compression": compression} if compression else {}),
    }


def raft_counts(s: dict) -> dict[str, Any]:
    """The raft step's open-book rows for the curation report: rows, oracle share, distractors, refusals."""
    return {k: s.get(k) for k in ("enabled", "rows", "oracle_share", "distractors", "refusals")} | {
        "quarantined": sum((s.get("quarantined") or {}).values())}


def _registry_champion(name: str) -> str | None:
    from stagewise import registry

    try:
        return registry.alias_version(name, registry.CHAMPION)
    except Exception:  # noqa: BLE001 - no tracking store configured (a summary built outside a run)
        return None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def stage_notes(summary: dict) -> list[str]:
    """What a stage's row cannot say in a cell: kept its parent, stopped early, warm-started."""
    out = []
    for r in summary.get("stages") or []:
        for key, label in (("kept_parent", "kept its parent"), ("stopped_early", "stopped early"),
                           ("ci_note", "precision")):
            if r.get(key):
                out.append(f"{r['name']}: {label}: {r[key]}")
        warm = r.get("warm_start")
        if warm and warm.get("ran"):
            out.append(f"{r['name']}: warm start (SFT on {warm.get('problems')} reference answers): sampled solve "
                       f"rate {warm['solve_rate_before']:.1%} → {warm.get('solve_rate_after', 0):.1%}")
    return out


def _ci(v: dict) -> str:
    return f" ({ci_text(v)})" if v.get("ci_low") is not None else ""


def context_lines(summary: dict) -> list[str]:
    """Numbers scored beside a stage's target (SFT's open-book reading on rag sets), parent → child."""
    out = []
    for r in summary.get("stages") or []:
        ctx = r.get("context") or {}
        if ctx:
            out.append(f"{r['name']} also: " + ", ".join(f"{m} {_fmt(v.get('baseline'))} → {_fmt(v.get('value'))}"
                                                        + _ci(v) for m, v in ctx.items()))
    raft = (summary.get("curation") or {}).get("raft")
    if raft and raft.get("enabled"):
        out.append(f"raft: {raft.get('rows')} open-book rows, oracle share {_fmt(raft.get('oracle_share'))}, "
                   f"{raft.get('distractors')} distractors, {raft.get('refusals')} refusals")
    return out


def summary_table(summary: dict) -> str:
    """Plain-text table: one line per stage, then the verdict."""
    head = ("stage", "version", "target", "parent", "child", "improved", "significant", "rulebook", "cached",
            "seconds")
    lines = [head]
    for r in summary["stages"]:
        sig = {True: "yes", False: "noise", None: "-"}[r.get("significant")]
        rules = "REJECTED" if r.get("kept_parent") else ("passed" if (r.get("rules") or {}).get("passed", True)
                                                          else "failed")
        lines.append((r["name"], _fmt(r.get("model_version")), _fmt(r.get("target_metric")),
                      _fmt(r.get("baseline_value")), _fmt(r.get("value")), _fmt(r.get("improved")), sig, rules,
                      _fmt(r.get("cached")), _fmt(r.get("seconds"))))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("")
    data = summary.get("data") or {}
    out.append(f"data steps: ran {', '.join(data.get('ran') or []) or 'none'}; "
               f"cached {', '.join(data.get('cached') or []) or 'none'}")
    out += stage_notes(summary)
    out += context_lines(summary)
    resolved = (summary.get("recipe") or {}).get("resolved") or []
    if resolved:
        out.append("recipe (auto settings, docs/training.md#recipes-that-transfer): "
                   + ", ".join(f"{r['setting']}={_fmt(r['value'])}" for r in resolved))
    for w in data.get("warnings") or []:
        out.append(f"WARNING: {w['message']}")
    sets = summary.get("eval_sets") or {}
    if sets:
        out.append("eval sets: " + ", ".join(
            f"{n} ({s['kind']}, {s['origin']}, {s['items'] if s['items'] is not None else '?'} items, "
            f"{s['data_hash'] or 'missing'})" for n, s in sets.items()))
    for note in summary.get("eval_notes") or []:
        out.append(f"eval: {note}")
    comp = summary.get("compression")
    if comp:
        line = f"compress: {'cached' if comp.get('cached') else 'ran'}, chose {comp.get('chosen') or 'nothing'}"
        chosen = next((c for c in comp.get("candidates") or [] if c.get("method") == comp.get("chosen")), None)
        parent = comp.get("parent") or {}
        if chosen and parent.get("tokens_per_s") and parent.get("memory_bytes"):
            line += (f" ({chosen['tokens_per_s'] / parent['tokens_per_s']:.2f}x the parent's tokens/s, "
                     f"{parent['memory_bytes'] / max(chosen['memory_bytes'], 1):.2f}x smaller in memory"
                     + (f", registered v{comp['model_version']}" if comp.get("model_version") else "") + ")")
        if comp.get("runner_up"):
            line += f"; runner-up {comp['runner_up']}"
        out.append(line)
    gate = summary.get("gate") or {}
    verdict = {True: "PASSED", False: "FAILED", None: "not run"}[gate.get("passed")]
    out.append(f"gate: {verdict}" + ("" if not gate.get("reasons") else " — " + "; ".join(gate["reasons"])))
    champ = summary.get("champion") or {}
    out.append(f"champion: {champ.get('name')} v{champ.get('version')}" if champ.get("version") else "champion: none")
    out.append(f"report: reports/{summary['run_id']}/ (summary.json, gate.md, gate.html)")
    return "\n".join(out)


def summary_markdown(summary: dict) -> str:
    return f"# Stagewise run `{summary['run_id']}`\n\n```\n{summary_table(summary)}\n```\n"
