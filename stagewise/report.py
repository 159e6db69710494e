"""The gate report: reports/<run_id>/gate.md and a self-contained gate.html from the run summary.

Written for a reader with ten seconds: the first lines say what was promoted (or not) and why;
then each gate rule with its numbers and confidence interval, the lineage of target metrics, the
data-curation funnel, leaked benchmark items found in the training data, and the compression
trade-off when there is one. Plots are matplotlib PNGs embedded as base64, so gate.html is a
single file that opens anywhere (MLflow artifact viewer, a mail attachment, a CI artifact).
Input schema: docs/summary.md.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from stagewise.metrics import higher_is_better
from stagewise.rulebook import ci_text

PASS_COLOR, FAIL_COLOR, NEUTRAL = "#1a7f37", "#cf222e", "#57606a"


# ---------------------------------------------------------------- text helpers
def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}"
    return str(v)


def _signed(v: Any, unit: str = "") -> str:
    """A delta in its metric's unit: points (proportions), % (perplexity, loss), nats (margins)."""
    if v is None:
        return "–"
    if unit == "nats":
        return f"{v:+.3g} nats"
    return f"{v:+.2f}{' pts' if unit == 'points' else unit}"


def _ver(d: dict | None) -> str:
    if not d or d.get("version") in (None, ""):
        return "none"
    return f"{d.get('name', 'model')} v{d['version']}"


def headline(summary: dict) -> tuple[bool | None, str, str]:
    """(passed, verdict line, why line): what a reader must get in ten seconds."""
    gate = summary.get("gate") or {}
    passed = gate.get("passed")
    champ, chall = summary.get("champion"), summary.get("challenger")
    if passed is None and gate:
        why = "; ".join(gate.get("reasons") or []) or "the gate did not run"
        return None, f"NOT GATED: nothing promoted; champion remains {_ver(champ)}", why
    passed = bool(passed)
    if passed:
        verdict = f"PROMOTED: {_ver(chall or champ)} is the champion"
    else:
        verdict = f"NOT PROMOTED: {_ver(chall)} stays challenger; champion remains {_ver(champ)}"
    reasons = gate.get("reasons") or []
    why = reasons[0] if reasons else ("gate passed" if passed else "gate failed")
    return passed, verdict, why


def compared_line(gate: dict) -> str:
    """Who the candidate was compared with, by version: 'vs' in the rules table refers to these."""
    cand = gate.get("candidate") or {}
    parts = [f"{k} {('v' + str(v)) if str(v).isdigit() else v}"
             for k, v in (gate.get("compared_with") or {}).items() if v not in (None, "")]
    if not cand and not parts:
        return ""
    who = f"candidate {cand.get('stage', '?')} v{cand.get('version', '?')}" if cand else "candidate"
    line = f"{who} compared with: " + (", ".join(parts) if parts else "nothing")
    return line + (" (base: where fine-tuning started)" if (gate.get("compared_with") or {}).get("base") else "")


def _rule_rows(gate: dict) -> list[list[str]]:
    rows = []
    for r in gate.get("rules") or []:
        unit = r.get("unit", "")
        ci = "–" if r.get("ci_low") is None else f"[{_signed(r['ci_low'], unit)}, {_signed(r['ci_high'], unit)}]"
        thr = r.get("threshold")
        if r.get("rule") == "target_improves":
            limit = "must improve"
        elif unit == "%":
            limit = f"rise ≤ {_num(thr)}%" if not r.get("higher_is_better") else f"drop ≤ {_num(thr)}%"
        elif unit == "nats":
            limit = f"drop ≤ {_num(thr)} nats ({_num(r.get('threshold_pct'))}% of mean |margin|)"
        else:
            limit = f"drop ≤ {_num(thr)} pts"
        verdict = ("PASS" if r.get("passed") else "FAIL") + ("" if r.get("enforced", True) else " (not enforced)")
        flips = {True: "yes – noise", False: "no", None: "–"}[r.get("flips_within_ci")]
        rows.append([verdict, r.get("rule", ""), r.get("metric", ""), r.get("against", ""), _num(r.get("baseline")),
                     _num(r.get("candidate")), _signed(r.get("delta"), unit), ci, limit, flips])
    return rows


def _comparison_rows(gate: dict) -> list[list[str]]:
    """Every other metric both sides were scored on (e.g. greedy accuracy beside a sampled target)."""
    rows = []
    for r in gate.get("comparisons") or []:
        unit = r.get("unit", "")
        ci = "–" if r.get("ci_low") is None else f"[{_signed(r['ci_low'], unit)}, {_signed(r['ci_high'], unit)}]"
        rows.append([r.get("metric", ""), r.get("against", ""), _num(r.get("baseline")), _num(r.get("candidate")),
                     _signed(r.get("delta"), unit), ci])
    return rows


COMPARISON_HEADERS = ["metric", "vs", "baseline", "candidate", "delta", "95% CI"]
COMPARISON_TITLE = "Also measured (not gate rules)"

RULE_HEADERS = ["verdict", "rule", "metric", "vs", "baseline", "candidate", "delta", "95% CI", "limit",
                "could flip"]


def _stage_rows(summary: dict) -> list[list[str]]:
    rows = []
    for s in summary.get("stages") or []:
        arrow = "↑" if s.get("higher_is_better", True) else "↓"
        rows.append([s.get("name", ""), f"v{s.get('model_version')}" if s.get("model_version") else "–",
                     f"v{s.get('parent_version')}" if s.get("parent_version") else "–",
                     f"{s.get('target_metric', '')} {arrow}", _num(s.get("baseline_value")), _num(s.get("value")),
                     {True: "yes", False: "NO", None: "–"}[s.get("improved")],
                     {True: "yes", False: "no – within noise", None: "–"}[s.get("significant")],
                     _stage_verdict(s),
                     "cached" if s.get("cached") else (f"{s['seconds']:.0f}s" if s.get("seconds") is not None else "–")])
    return rows


def _stage_verdict(s: dict) -> str:
    """Accepted, or rejected with the rule that failed (the rulebook at the stage)."""
    if s.get("kept_parent"):
        return "REJECTED: " + ((s.get("rules") or {}).get("failed") or [s["kept_parent"]])[0]
    failed = (s.get("rules") or {}).get("failed") or []
    return "accepted" if not failed else f"accepted (keep_parent_on_regression off): {failed[0]}"


STAGE_HEADERS = ["stage", "version", "parent", "target", "parent value", "value", "improved", "significant",
                 "rulebook", "time"]


def _tried_rows(gate: dict) -> list[list[str]]:
    """The candidates the gate judged, in the fallback order, and why each failed."""
    rows = []
    for t in gate.get("tried") or []:
        c = t.get("candidate") or {}
        what = f"{c.get('compression')} of {c.get('evaluated_as')}" if c.get("compression") else c.get("stage", "")
        rows.append([f"v{c.get('version')}", what, "PASS" if t.get("passed") else "FAIL",
                     "; ".join(t.get("reasons") or []) if not t.get("passed") else f"all {t.get('enforced')} rules"])
    return rows


TRIED_HEADERS = ["candidate", "model", "verdict", "why"]
CONTEXT_HEADERS = ["stage", "metric", "parent", "value", "change"]
CONTEXT_TITLE = ("Measured beside the targets, never a rule (SFT: tool calling on tools sets; open-book reading on "
                 "rag sets — with the oracle, distractors only, quotes)")


def _context_rows(summary: dict) -> list[list[str]]:
    """Metrics scored beside each stage's target (its row's `context`)."""
    return [[s.get("name", ""), c, _num(v.get("baseline")), _num(v.get("value")), ci_text(v) or "–"]
            for s in summary.get("stages") or [] for c, v in (s.get("context") or {}).items()]


def _raft_line(r: dict) -> str:
    if not r.get("enabled"):
        return "Open-book chats (raft): off (raft.enabled: false)."
    share = "–" if r.get("oracle_share") is None else f"{r['oracle_share']:.0%}"
    return (f"Open-book chats (raft): {r.get('rows')} rows, oracle kept in {share}, {r.get('distractors')} "
            f"distractors each, {r.get('refusals')} refusals, {r.get('quarantined', 0)} records quarantined.")


def _no_leak_list(cur: dict) -> str:
    n = (cur.get("removed") or {}).get("contaminated", 0)
    if n:
        return (f"{n} training record(s) were removed as contaminated, but the run summary carries no per-item "
                "list; see data/05_curated/removed/contaminated.jsonl.")
    return "None found."


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(headers: list[str], rows: list[list[str]], verdict_col: int | None = None) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for r in rows:
        cls = ""
        if verdict_col is not None:
            cls = ' class="fail"' if str(r[verdict_col]).startswith(("FAIL", "NO")) else ' class="pass"'
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


SIZE_KEYS = ("memory_bytes", "bytes", "size_mb", "memory_mb", "size_bytes", "params")
QUALITY_KEYS = ("value", "metric_value", "quality", "score", "accuracy")


def _pick(d: dict, *keys: str):
    for k in keys:
        if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool):
            return k, float(d[k])
    return None, None


def _cand_name(c: Any) -> str:
    if isinstance(c, dict):
        return str(c.get("method") or c.get("name") or c.get("version") or "?")
    return "none" if c is None else str(c)


def compression_points(summary: dict) -> list[dict]:
    """Normalise tasks/compress.py's result (or a plain {method, size_mb, value} list) to plot/table rows."""
    comp = summary.get("compression") or {}
    chosen = _cand_name(comp.get("chosen")) if comp.get("chosen") is not None else None
    rows = []
    parent = comp.get("parent_measure")
    for c, is_parent in [(parent, True)] * isinstance(parent, dict) + [(c, False) for c in comp.get("candidates") or []]:
        if not isinstance(c, dict):
            continue
        metrics = c.get("metrics") if isinstance(c.get("metrics"), dict) else {}
        qk = (c.get("check") or {}).get("task_metric") or comp.get("task_metric")
        q = metrics.get(qk) if qk else None
        if q is None:
            qk, q = _pick(c, *QUALITY_KEYS)
        if q is None and metrics:
            qk, q = next(((k, v) for k, v in metrics.items() if isinstance(v, (int, float))), (None, None))
        sk, size = _pick(c, *SIZE_KEYS)
        name = "parent" if is_parent else _cand_name(c)
        check = c.get("check") or {}
        rows.append({"name": name, "size": size, "size_key": sk, "quality": q, "quality_key": qk,
                     "is_parent": is_parent, "chosen": name == chosen and not is_parent,
                     "tokens_per_s": c.get("tokens_per_s"), "tokens_per_s_batched": c.get("tokens_per_s_batched"),
                     "error": c.get("error"), "failed": c.get("failed") or check.get("failed") or [],
                     "passes": None if is_parent or c.get("error") else c.get("eligible", check.get("passed")),
                     "higher_is_better": c.get("higher_is_better", higher_is_better(qk or ""))})
    return rows


def _compression_table(summary: dict) -> tuple[list[str], list[list[str]], str]:
    rows = compression_points(summary)
    comp = summary.get("compression") or {}
    size_key = next((r["size_key"] for r in rows if r["size_key"]), "size")
    q_key = next((r["quality_key"] for r in rows if r["quality_key"]), "quality")
    scale = 1e6 if size_key in ("bytes", "memory_bytes", "size_bytes") else 1.0
    label = {"memory_bytes": "MB in memory", "bytes": "MB on disk", "size_bytes": "MB"}.get(size_key, size_key)
    parent = next((r for r in rows if r["is_parent"]), None)
    base_tps = (parent or {}).get("tokens_per_s")
    out = []
    for r in rows:
        ratio = (r["tokens_per_s"] / base_tps) if r["tokens_per_s"] and base_tps else None
        verdict = r["error"] or {True: "yes", False: "no", None: "–"}[r["passes"]]
        if r["passes"] is False and r["failed"]:
            verdict += ": " + "; ".join(r["failed"])
        out.append([r["name"] + (" (chosen)" if r["chosen"] else ""),
                    _num(None if r["size"] is None else r["size"] / scale), _num(r["quality"]),
                    _num(r["tokens_per_s"]), "–" if ratio is None else f"{ratio:.2f}x",
                    _num(r["tokens_per_s_batched"]), verdict])
    chosen = comp.get("chosen")
    why = comp.get("reason") or ""
    line = f"Chosen: {_cand_name(chosen)}" + (f" — {why}" if why else "")
    from stagewise.machine import label as machine_label   # a speed ratio is only true of its machine

    line += f" Tokens/s measured on {machine_label(comp.get('machine'))}."
    return (["candidate", label, q_key, "tokens/s (batch 1)", "vs parent", "tokens/s (batched)", "eligible"],
            out, line)


def shipped_rows(summary: dict) -> tuple[list[str], list[list[str]]] | None:
    """Uncompressed vs shipped, side by side: what compression changed in the model that was gated."""
    comp = summary.get("compression") or {}
    parent = comp.get("parent") or comp.get("parent_measure")
    chosen = next((c for c in comp.get("candidates") or [] if c.get("method") == comp.get("chosen")), None)
    if not comp.get("chosen") or not isinstance(parent, dict) or chosen is None:
        return None
    up = comp.get("parent_version")
    head = ["measure", f"uncompressed{f' (v{up})' if up else ''}",
            f"shipped: {comp['chosen']}" + (f" (v{comp['model_version']})" if comp.get("model_version") else ""),
            "shipped / uncompressed"]

    def row(label, a, b, scale=1.0, ratio=True):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return None
        r = f"{b / a:.2f}x" if ratio and a else f"{(b - a):+.4g}"
        fmt = (lambda v: f"{int(v):,}") if label == "parameters" else (lambda v: _num(v / scale))  # noqa: E731
        return [label, fmt(a), fmt(b), r]

    rows = [row("parameters", parent.get("params"), chosen.get("params")),
            row("memory (MB)", parent.get("memory_bytes"), chosen.get("memory_bytes"), 1e6),
            row("weights on disk (MB)", parent.get("bytes"), chosen.get("bytes"), 1e6),
            row("tokens/s, batch 1", parent.get("tokens_per_s"), chosen.get("tokens_per_s")),
            row("tokens/s, batched", parent.get("tokens_per_s_batched"), chosen.get("tokens_per_s_batched"))]
    pm, cm = parent.get("metrics") or {}, chosen.get("metrics") or {}
    rows += [row(k, pm[k], cm.get(k), ratio=False) for k in pm if k in cm]
    return head, [r for r in rows if r is not None]


# ---------------------------------------------------------------- plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_rules(gate: dict) -> str | None:
    """Forest plot: each rule's delta with its CI and its limit — the verdict at a glance."""
    rules = [r for r in gate.get("rules") or [] if r.get("delta") is not None]
    if not rules:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rules) + 1.2))
    for i, r in enumerate(rules):
        y = len(rules) - 1 - i
        color = PASS_COLOR if r.get("passed") else FAIL_COLOR
        if r.get("ci_low") is not None:
            ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=color, lw=2, alpha=0.6)
        ax.plot([r["delta"]], [y], "o", color=color, ms=8)
        thr = r.get("threshold") or 0.0
        limit = {"general_no_drop": -thr, "general_ppl_rise": thr}.get(r.get("rule"), 0.0)
        ax.plot([limit, limit], [y - 0.35, y + 0.35], color="black", lw=1.5, ls="--")
    ax.set_yticks(range(len(rules)))
    ax.set_yticklabels([f"{r['metric']} vs {r['against']} ({'pts' if r.get('unit') == 'points' else r.get('unit', '%')})"
                        for r in reversed(rules)])
    ax.axvline(0, color=NEUTRAL, lw=0.8)
    ax.set_xlabel("delta (points for proportions, % for perplexity, nats for margins); dashed: limit; bar: bootstrap CI")
    ax.set_title("Gate rules")
    return _png(fig)


def plot_lineage(summary: dict) -> str | None:
    """Each stage's target metric, parent vs child, and the general metrics along the lineage."""
    stages = [s for s in summary.get("stages") or [] if s.get("value") is not None]
    if not stages:
        return None
    import matplotlib.pyplot as plt

    general_names = sorted({k for s in stages for k in (s.get("general") or {})})
    n = len(stages) + len(general_names)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, s in zip(flat, stages):
        base, val = s.get("baseline_value"), s.get("value")
        color = PASS_COLOR if s.get("improved") else FAIL_COLOR
        xs, ys, cs = [], [], []
        if base is not None:
            xs.append("parent"), ys.append(base), cs.append(NEUTRAL)
        xs.append(s["name"]), ys.append(val), cs.append(color)
        ax.bar(xs, ys, color=cs)
        for x, y in zip(xs, ys):
            ax.annotate(_num(y, 3), (x, y), ha="center", va="bottom", fontsize=8)
        if s.get("higher_is_better") is False and all(y and y > 0 for y in ys) and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        arrow = "↑" if s.get("higher_is_better", True) else "↓"
        ax.set_title(f"{s['name']}: {s.get('target_metric', '')} {arrow}", fontsize=9)
    for ax, g in zip(flat[len(stages):], general_names):
        names = [s["name"] for s in stages if g in (s.get("general") or {})]
        vals = [s["general"][g].get("value") for s in stages if g in (s.get("general") or {})]
        first = next((s["general"][g].get("baseline") for s in stages if g in (s.get("general") or {})), None)
        if first is not None:
            names, vals = ["start"] + names, [first] + vals
        ax.plot(names, vals, "o-", color="#0969da")
        pos = [v for v in vals if isinstance(v, (int, float)) and v > 0]
        if "perplexity" in g and pos and max(pos) / min(pos) > 20:
            ax.set_yscale("log")  # random init → trained spans orders of magnitude
        ax.set_title(f"general: {g}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle("Target metric per stage along the lineage", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def plot_funnel(summary: dict) -> str | None:
    """Records kept after each curation step, per record kind."""
    funnel = (summary.get("curation") or {}).get("funnel") or []
    if not funnel:
        return None
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(f.get("kind", "?") for f in funnel))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.3 * len(kinds), 3.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [f for f in funnel if f.get("kind", "?") == kind]
        labels = ["input"] + [str(f.get("step")) for f in rows]
        vals = [rows[0].get("input", 0)] + [f.get("kept", 0) for f in rows]
        ax.barh(labels[::-1], vals[::-1], color=["#0969da"] * len(rows) + [NEUTRAL])
        for y, v in enumerate(vals[::-1]):
            ax.annotate(str(v), (v, y), va="center", fontsize=8)
        ax.set_title(kind, fontsize=10)
        ax.set_xlim(0, max(vals) * 1.2 if max(vals) else 1)
    fig.suptitle("Data-curation funnel (records kept after each step)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def plot_pareto(summary: dict) -> str | None:
    """Compression candidates: size vs quality, the Pareto front and the chosen one.

    tasks/compress.py draws the richer plot (size × tokens/s, task metric as colour): embedded as is
    when it exists.
    """
    existing = (summary.get("compression") or {}).get("plot")
    if existing and Path(existing).is_file():
        return base64.b64encode(Path(existing).read_bytes()).decode()
    pts = [r for r in compression_points(summary) if r["size"] is not None and r["quality"] is not None]
    if not pts:
        return None
    import matplotlib.pyplot as plt

    hib = pts[0]["higher_is_better"]
    better = (lambda a, b: a >= b) if hib else (lambda a, b: a <= b)
    front = sorted((p["size"], p["quality"]) for p in pts
                   if not any(o is not p and o["size"] <= p["size"] and better(o["quality"], p["quality"])
                              and (o["size"], o["quality"]) != (p["size"], p["quality"]) for o in pts))
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in pts:
        color = "black" if p["is_parent"] else (PASS_COLOR if p["chosen"] else "#0969da")
        ax.scatter([p["size"]], [p["quality"]], s=110 if p["chosen"] else 40, color=color,
                   marker="*" if p["chosen"] else "o", zorder=3)
        ax.annotate(p["name"] + (" (chosen)" if p["chosen"] else ""), (p["size"], p["quality"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color=NEUTRAL, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(pts[0]["size_key"])
    ax.set_ylabel(f"{pts[0]['quality_key']} ({'higher' if hib else 'lower'} is better)")
    ax.set_title("Compression: size vs quality")
    return _png(fig)


# ---------------------------------------------------------------- writers
EVAL_SET_HEADERS = ["set", "kind", "origin", "items", "data hash", "path"]


def _eval_set_rows(summary: dict) -> list[list[str]]:
    return [[n, s.get("kind"), s.get("origin"), str(s.get("items")), s.get("data_hash") or "missing", s.get("path")]
            for n, s in (summary.get("eval_sets") or {}).items()]


def render_markdown(summary: dict) -> str:
    passed, verdict, why = headline(summary)
    gate = summary.get("gate") or {}
    out = [f"# Gate report — run {summary.get('run_id', '?')}", "",
           f"**{verdict}**", "", f"Why: {why}", ""]
    meta = [f"profile `{summary.get('profile', '?')}`"]
    for key in ("started", "finished"):
        if summary.get(key):
            meta.append(f"{key} {summary[key]}")
    out += [" · ".join(meta), ""]
    out += ["## Gate rules", ""]
    if compared_line(gate):
        out += [compared_line(gate), ""]
    out += [_md_table(RULE_HEADERS, _rule_rows(gate)) if gate.get("rules") else "_no rules applied_", ""]
    if len(gate.get("tried") or []) > 1:
        out += ["## Candidates tried (fallback order)", "", _md_table(TRIED_HEADERS, _tried_rows(gate)), ""]
    if gate.get("reasons"):
        out += ["Reasons and notes:", ""] + [f"- {r}" for r in gate["reasons"]] + [""]
    if gate.get("comparisons"):
        out += [f"{COMPARISON_TITLE}:", "", _md_table(COMPARISON_HEADERS, _comparison_rows(gate)), ""]
    side = shipped_rows(summary)
    if side:
        out += ["## Uncompressed vs shipped", "", _md_table(*side), ""]
    out += ["## Stages (target metric along the lineage)", "", _md_table(STAGE_HEADERS, _stage_rows(summary)), ""]
    from stagewise.summary import stage_notes

    if stage_notes(summary):
        out += [f"- {n}" for n in stage_notes(summary)] + [""]
    if summary.get("eval_sets"):
        out += ["## Evaluation sets behind these numbers", "", _md_table(EVAL_SET_HEADERS, _eval_set_rows(summary)), ""]
        out += [f"- {n}" for n in summary.get("eval_notes") or []] + ([""] if summary.get("eval_notes") else [])
    warnings = (summary.get("data") or {}).get("warnings") or []
    if warnings:
        out += ["## Data warnings", ""] + [f"- **{w['message']}**" for w in warnings] + [""]
    general = [(s.get("name"), g, v) for s in summary.get("stages") or [] for g, v in (s.get("general") or {}).items()]
    if general:
        out += ["General metrics (forgetting guard):", "",
                _md_table(["stage", "metric", "parent", "value"],
                          [[n, g, _num(v.get("baseline")), _num(v.get("value"))] for n, g, v in general]), ""]
    context = _context_rows(summary)
    if context:
        out += [f"{CONTEXT_TITLE}:", "", _md_table(CONTEXT_HEADERS, context), ""]
    cur = summary.get("curation") or {}
    if cur.get("raft"):
        out += [_raft_line(cur["raft"]), ""]
    if cur.get("funnel"):
        out += ["## Data curation funnel", "",
                _md_table(["step", "kind", "input", "kept"],
                          [[f.get("step"), f.get("kind"), f.get("input"), f.get("kept")] for f in cur["funnel"]]), ""]
    if cur.get("removed"):
        out += ["Removed by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(cur["removed"].items())), ""]
    leaked = cur.get("contaminated") or []
    out += ["## Contamination found in training data", ""]
    if leaked:
        out += [f"{len(leaked)} training record(s) contained benchmark items and were removed before training:", "",
                _md_table(["training record", "kind", "benchmark item"],
                          [[c.get("id"), c.get("kind"), c.get("benchmark_item")] for c in leaked]), ""]
    else:
        out += [_no_leak_list(cur), ""]
    if compression_points(summary):
        headers, rows, line = _compression_table(summary)
        out += ["## Compression candidates", "", _md_table(headers, rows), "", line, ""]
    out += ["Plots: see gate.html next to this file.", ""]
    return "\n".join(out)


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#1f2328}
.verdict{padding:18px 22px;border-radius:8px;color:#fff;margin-bottom:8px}
.verdict h1{margin:0;font-size:26px}.verdict p{margin:6px 0 0;font-size:15px}
.pass-bg{background:#1a7f37}.fail-bg{background:#cf222e}.none-bg{background:#57606a}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left}th{background:#f6f8fa}
tr.fail td:first-child{color:#cf222e;font-weight:bold}tr.pass td:first-child{color:#1a7f37;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:6px 0}.meta{color:#57606a;font-size:13px}
h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
"""


def render_html(summary: dict) -> str:
    passed, verdict, why = headline(summary)
    gate = summary.get("gate") or {}
    e = html.escape
    img = lambda b64, alt: f'<img alt="{e(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""  # noqa: E731
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Gate report {e(str(summary.get('run_id', '')))}: "
        f"{ {True: 'PASSED', False: 'FAILED', None: 'NOT GATED'}[passed] }</title>",
        f"<style>{CSS}</style></head><body>",
        f"<div id='verdict' class='verdict { {True: 'pass-bg', False: 'fail-bg', None: 'none-bg'}[passed]}'><h1>{e(verdict)}</h1>"
        f"<p>Why: {e(why)}</p></div>",
        f"<p class='meta'>run {e(str(summary.get('run_id', '?')))} · profile {e(str(summary.get('profile', '?')))}"
        + "".join(f" · {k} {e(str(summary[k]))}" for k in ("started", "finished") if summary.get(k)) + "</p>",
        "<h2>Gate rules</h2>",
        f"<p class='meta'>{e(compared_line(gate))}</p>" if compared_line(gate) else "",
        _html_table(RULE_HEADERS, _rule_rows(gate), verdict_col=0) if gate.get("rules") else "<p>No rules applied.</p>",
        img(plot_rules(gate), "gate rules: deltas with confidence intervals and limits"),
    ]
    if len(gate.get("tried") or []) > 1:
        parts += ["<h2>Candidates tried (fallback order)</h2>", _html_table(TRIED_HEADERS, _tried_rows(gate), verdict_col=2)]
    if gate.get("reasons"):
        parts.append("<ul>" + "".join(f"<li>{e(r)}</li>" for r in gate["reasons"]) + "</ul>")
    if gate.get("comparisons"):
        parts += [f"<h3>{e(COMPARISON_TITLE)}</h3>", _html_table(COMPARISON_HEADERS, _comparison_rows(gate))]
    side = shipped_rows(summary)
    if side:
        parts += ["<h2>Uncompressed vs shipped</h2>", _html_table(*side)]
    parts += ["<h2>Stages: target metric along the lineage</h2>",
              _html_table(STAGE_HEADERS, _stage_rows(summary), verdict_col=None),
              img(plot_lineage(summary), "target metric per stage")]
    from stagewise.summary import stage_notes

    if stage_notes(summary):
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in stage_notes(summary)) + "</ul>")
    if summary.get("eval_sets"):
        parts += ["<h2>Evaluation sets behind these numbers</h2>", _html_table(EVAL_SET_HEADERS, _eval_set_rows(summary))]
        if summary.get("eval_notes"):
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in summary["eval_notes"]) + "</ul>")
    warnings = (summary.get("data") or {}).get("warnings") or []
    if warnings:
        parts += ["<h2 id='data-warnings'>Data warnings</h2>",
                  "<ul>" + "".join(f"<li><b>{e(w['message'])}</b></li>" for w in warnings) + "</ul>"]
    if _context_rows(summary):
        parts += [f"<h3>{e(CONTEXT_TITLE)}</h3>", _html_table(CONTEXT_HEADERS, _context_rows(summary))]
    cur = summary.get("curation") or {}
    if cur.get("raft"):
        parts.append(f"<p>{e(_raft_line(cur['raft']))}</p>")
    if cur.get("funnel") or cur.get("removed"):
        parts.append("<h2>Data curation funnel</h2>")
        parts.append(img(plot_funnel(summary), "data-curation funnel"))
        if cur.get("removed"):
            parts.append("<p>Removed by reason: " + e(", ".join(f"{k} {v}" for k, v in sorted(cur["removed"].items())))
                         + "</p>")
    leaked = cur.get("contaminated") or []
    parts.append("<h2 id='contamination'>Contamination found in training data</h2>")
    if leaked:
        parts.append(f"<p>{len(leaked)} training record(s) contained benchmark items and were removed before "
                     "training:</p>")
        parts.append(_html_table(["training record", "kind", "benchmark item"],
                                 [[c.get("id"), c.get("kind"), c.get("benchmark_item")] for c in leaked]))
    else:
        parts.append(f"<p>{e(_no_leak_list(cur))}</p>")
    if compression_points(summary):
        headers, rows, line = _compression_table(summary)
        parts += ["<h2>Compression</h2>", img(plot_pareto(summary), "compression Pareto plot"),
                  _html_table(headers, rows), f"<p>{e(line)}</p>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_gate_report(out_dir: Path, summary: dict) -> tuple[Path, Path]:
    """Write out_dir/gate.md and a self-contained out_dir/gate.html (plots embedded)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "gate.md", out_dir / "gate.html"
    md.write_text(render_markdown(summary), encoding="utf-8")
    page.write_text(render_html(summary), encoding="utf-8")
    return md, page
