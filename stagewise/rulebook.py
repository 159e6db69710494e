"""The one rulebook: every decision that decides what a run ships applies these rules, with the same
metrics, limits and statistics.

Who asks (docs/evaluation.md#one-rulebook):
  - a training stage accepting its child (stagewise/stage.py: a child that fails is registered as
    rejected with the rule that failed, and the next stage trains on the parent);
  - the compressor choosing a candidate (tasks/compress.py: a candidate is eligible only if it passes);
  - the final gate, candidate by candidate down the fallback order (tasks/gate.py);
  - `stagewise gate` on the command line (stagewise/cli_registry.py).

Rules (params.yaml `gate:`):
  1. target_improves: the stage's own target (`<stage>.target`) beats the parent's.
  2. task_within_limit (a compressed candidate): against the uncompressed model the target may drop at
     most `compress.select.max_task_drop_points` (or rise `max_task_rise_pct` % when loss-like).
  3. general_no_drop / general_ppl_rise / general_margin_drop: every `gate.general` metric within its
     limit vs each of `gate.against` (parent, base — where fine-tuning started — and champion) and vs
     the uncompressed model of a compressed candidate.
  4. earlier_target_kept (`gate.guard_earlier_targets`): the target of every earlier accepted stage stays
     within the same limits vs the model that first reached it, so a later stage cannot trade away what
     an earlier one taught.

Units follow the metric's kind (stagewise/metrics.py): a proportion changes in points (0-100), a
perplexity or loss in % of the baseline, a log-likelihood margin in nats (absolute; its limit is
`gate.margin_max_drop_pct` of the baseline's mean |margin| over its pairs: `margin_scale`). Every
delta carries a bootstrap CI from the per-item scores evaluate() keeps (paired over shared items),
and says whether the verdict could flip inside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from stagewise.metrics import metric as metric_info

EPS = 1e-9
UNITS = {"accuracy": "points", "perplexity": "%", "loss": "%", "margin": "nats"}


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

    def failed(self) -> list[dict]:
        return [r for r in self.rules if r["enforced"] and not r["passed"]]


@dataclass
class Guard:
    """An earlier accepted stage's target, and the scores of the model that first reached it."""

    stage: str
    version: str | None
    scores: dict
    who: str | None = None    # how the rule names the model (default: "<stage> model v<version>")


def relative(metric: str, higher_is_better: bool) -> bool:
    """Perplexity-like metrics are compared in % change; proportions in points, margins in nats."""
    return metric_info(metric).relative or (not higher_is_better and metric_info(metric).kind != "margin")


def unit_of(metric: str, higher_is_better: bool) -> str:
    return "%" if relative(metric, higher_is_better) else UNITS.get(metric_info(metric).kind, "points")


def fmt_delta(delta: float | None, unit: str) -> str:
    """'+2.50 points', '-1.3%', '+0.412 nats': no margin is ever shown in points."""
    if delta is None:
        return "–"
    if unit == "%":
        return f"{delta:+.1f}%"
    if unit == "nats":
        return f"{delta:+.3g} nats"
    return f"{delta:+.2f} points"


def ci_text(v: dict) -> str:
    """'95% CI of the change +76.2..+93.8 points' of a context row that has one, else ''."""
    if v.get("ci_low") is None:
        return ""
    unit = v.get("unit") or ""
    num = (lambda x: f"{x:+.1f}") if unit in ("points", "%") else (lambda x: f"{x:+.3g}")
    return (f"{v.get('confidence', 0.95):.0%} CI of the change {num(v['ci_low'])}..{num(v['ci_high'])}"
            + ("%" if unit == "%" else f" {unit}"))


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


def _delta(metric: str, unit: str, cand, base):
    if unit == "%":
        return 100.0 * (cand / base - 1.0)
    return (cand - base) if unit == "nats" else 100.0 * (cand - base)


def bootstrap_delta_ci(metric: str, rel: bool | str, cand_res: dict, base_res: dict, iters: int,
                       confidence: float, seed: int = 0) -> tuple[float | None, float | None, bool]:
    """Percentile CI of the delta; paired over shared items when possible. Returns (lo, hi, paired).

    `rel`: the unit ('points' | '%' | 'nats'), or a bool (True: '%', False: the metric's own unit)."""
    import numpy as np

    unit = rel if isinstance(rel, str) else ("%" if rel else unit_of(metric, True))
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
        d = _delta(metric, unit, _agg(metric, ca, idx), _agg(metric, ba, idx))
    else:
        d = _delta(metric, unit, _agg(metric, ca, rng.integers(0, len(ca), size=(iters, len(ca)))),
                   _agg(metric, ba, rng.integers(0, len(ba), size=(iters, len(ba)))))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(d, [alpha, 1.0 - alpha])
    return float(lo), float(hi), paired


def margin_scale(res: dict, metric: str) -> float:
    """The size a margin's limit is a share of: the mean |margin| over the baseline's pairs.

    Not |mean margin|: a model that separates every pair by ±4 nats, half each way, has a mean near
    zero, and a limit of 10% of ~0 rejects a stage for a drop far inside noise (the smollm2 profile's
    reasoning stage was, twice: docs/evaluation.md). Equal to |mean| when all pairs lean one way."""
    import numpy as np

    arr, _ = _arrays(res, metric)
    return float(np.abs(arr[:, 0]).mean()) if arr is not None else abs(float(res[metric]))


# ---------------------------------------------------------------- one rule row
def compare(rule: str, task_name: str, metric: str, hib: bool, against: str, cand: dict, base: dict,
            threshold: float, kind: str, iters: int, confidence: float, enforced: bool,
            decide_on: str = "estimate", limit_setting: str = "") -> dict | None:
    """One rule row. kind: 'improve' (delta must beat the threshold), 'max_drop' (delta >= -thr),
    'max_rise' (delta <= thr). A margin's threshold is given in % of the baseline and applied in nats."""
    if task_name not in base or metric not in base[task_name]:
        return None
    unit = unit_of(metric, hib)
    row: dict[str, Any] = {
        "rule": rule, "metric": f"{task_name}.{metric}", "against": against, "higher_is_better": hib,
        "unit": unit, "kind": metric_info(metric).kind, "enforced": enforced, "limit_setting": limit_setting,
    }
    b = float(base[task_name][metric])
    if unit == "nats" and kind != "improve":
        row["threshold_pct"], row["threshold_scale"] = threshold, margin_scale(base[task_name], metric)
        threshold = row["threshold_scale"] * threshold / 100.0
    if task_name not in cand or metric not in cand[task_name]:
        return row | {"candidate": None, "baseline": b, "delta": None, "threshold": threshold,
                      "ci_low": None, "ci_high": None, "paired": False, "passed": False, "flips_within_ci": None}
    c = float(cand[task_name][metric])
    delta = _delta(metric, unit, c, b)
    lo, hi, paired = bootstrap_delta_ci(metric, unit, cand[task_name], base[task_name], iters, confidence)

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


def significant(row: dict | None) -> bool | None:
    """Is a target row's gain outside noise (its whole CI on the better side of zero)? None: no CI."""
    if not row or row.get("ci_low") is None:
        return None
    better = (lambda d: d > 0) if row["higher_is_better"] else (lambda d: d < 0)
    return better(row["ci_low"]) and better(row["ci_high"])


def describe(r: dict) -> str:
    """One line: which rule failed, by how much, against whom, and the setting that sets the limit."""
    if r["candidate"] is None:
        return f"{r['metric']} was not evaluated on the candidate (it is needed to compare with the {r['against']})"
    u = r["unit"]
    d = fmt_delta(r["delta"], u)
    ci = "" if r["ci_low"] is None else f" (delta CI {fmt_delta(r['ci_low'], u)}..{fmt_delta(r['ci_high'], u)})"
    vals = f"{r['baseline']:.4g} → {r['candidate']:.4g}"
    lim = _limit(r)
    if r["rule"] == "target_improves":
        if r.get("decided_on") == "ci" and (r["delta"] > 0) == r["higher_is_better"] and r["delta"] != 0:
            return (f"target {r['metric']} improvement over the {r['against']} is within noise: {vals}, {d}{ci} "
                    "(gate.decide_on=ci needs the whole CI to improve)")
        return f"target {r['metric']} did not improve over the {r['against']}: {vals}, {d}{ci}"
    moved = _moved(r)
    if r["rule"] == "task_within_limit":
        return f"compression cost: target {r['metric']} {moved}{ci} vs the uncompressed model ({vals}); limit {lim}"
    if r["rule"] == "earlier_target_kept":
        return (f"undoes an earlier stage: {r['metric']} {moved}{ci} vs the {r['against']} that first reached it "
                f"({vals}); limit {lim}")
    return f"forgetting: {r['metric']} {moved}{ci} vs the {r['against']} ({vals}); limit {lim}"


def _moved(r: dict) -> str:
    """'dropped 2.50 points', 'rose 12.3%', 'dropped 0.41 nats'."""
    d, u = r["delta"], r["unit"]
    size = f"{abs(d):.1f}%" if u == "%" else f"{abs(d):.3g} nats" if u == "nats" else f"{abs(d):.2f} points"
    return f"{'rose' if d > 0 else 'dropped'} {size}"


def _limit(r: dict) -> str:
    u, t = r["unit"], r["threshold"]
    sign = "+" if (r["unit"] == "%" and not r["higher_is_better"]) else "-"
    if u == "nats":
        scale = r.get("threshold_scale", abs(r["baseline"]))
        text = f"-{t:.3g} nats ({r.get('threshold_pct', 0):g}% of the mean |margin| {scale:.4g})"
    else:
        text = f"{sign}{t:g}{'%' if u == '%' else ' points'}"
    return text + (f" ({r['limit_setting']})" if r.get("limit_setting") else "")


# ---------------------------------------------------------------- the rulebook
@dataclass
class Rulebook:
    """The rules, limits and statistics of one run (from params.yaml's `gate:` and `compress.select`)."""

    gate: Any                      # GateConfig
    evals: Any                     # stagewise.evalsets.EvalPlan
    iters: int = 1000
    seed: int = 0
    task_max_drop_points: float = 2.0
    task_max_rise_pct: float = 5.0

    @classmethod
    def of(cls, cfg, evals) -> "Rulebook":
        sel = cfg.compress.select
        return cls(cfg.gate, evals, iters=cfg.evaluate.bootstrap_iters, seed=cfg.run.seed,
                   task_max_drop_points=sel.max_task_drop_points, task_max_rise_pct=sel.max_task_rise_pct)

    def limit(self, metric: str, hib: bool) -> tuple[str, str, float, str]:
        """(rule name, comparison kind, threshold, setting) that guards `metric` against forgetting."""
        g = self.gate
        if relative(metric, hib):
            return "general_ppl_rise", "max_rise", g.perplexity_max_rise_pct, "gate.perplexity_max_rise_pct"
        if metric_info(metric).kind == "margin":
            return "general_margin_drop", "max_drop", g.margin_max_drop_pct, "gate.margin_max_drop_pct"
        return "general_no_drop", "max_drop", g.general_max_drop_points, "gate.general_max_drop_points"

    def guards_for(self, stage: str, accepted: list) -> list[Guard]:
        """Earlier accepted stages whose targets `stage` must keep (their lineages' scores)."""
        if not self.gate.guard_earlier_targets:
            return []
        general = {g.label for g in self.evals.general}
        out = []
        for x in accepted:
            t = self.evals.targets.get(x.stage)
            if x.stage == stage or t is None or t.label in general or not x.metrics:
                continue
            out.append(Guard(x.stage, x.version, x.metrics))
        return out

    def champion_stages(self, champion_stage: str | None, stage: str) -> list[str]:
        """The stages whose targets a candidate must keep against the champion: every stage up to the one
        the champion was trained by (a fallback to an earlier model may not drop the champion's skills)."""
        from stagewise.evalsets import STAGE_KIND

        order = list(STAGE_KIND)
        if not self.gate.guard_earlier_targets or champion_stage not in order:
            return []
        general = {g.label for g in self.evals.general}
        return [s for s in order[: order.index(champion_stage) + 1]
                if s != stage and s in self.evals.targets and self.evals.targets[s].label not in general]

    def judge(self, stage: str, candidate: dict, parent: dict | None = None, base: dict | None = None,
              champion: dict | None = None, uncompressed: dict | None = None,
              guards: list[Guard] = ()) -> GateResult:
        """Apply every rule to evaluate() results of a candidate and of whom it is compared with.

        `base`: the model fine-tuning started from, when it is not the parent itself (None otherwise).
        `uncompressed`: for a compressed candidate, the model it was made from (`parent` stays the
        training stage's parent). `guards`: earlier accepted stages whose targets must be kept.
        """
        cfg, evals = self.gate, self.evals
        iters, conf = self.iters, cfg.confidence
        rules: list[dict] = []
        notes: list[str] = []
        target = evals.targets.get(stage)

        if target is not None and parent is not None:
            t, m, hib = target.task, target.metric, target.higher_is_better
            row = compare("target_improves", t, m, hib, "parent", candidate, parent, 0.0, "improve", iters, conf,
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
            if relative(m, hib):
                thr, setting = self.task_max_rise_pct, "compress.select.max_task_rise_pct"
            elif unit_of(m, hib) == "nats":   # a margin target: the margin limit, in % of its size
                thr, setting = cfg.margin_max_drop_pct, "gate.margin_max_drop_pct"
            else:
                thr, setting = self.task_max_drop_points, "compress.select.max_task_drop_points"
            row = compare("task_within_limit", t, m, hib, "uncompressed", candidate, uncompressed, thr,
                          "max_drop" if hib else "max_rise", iters, conf, enforced=True, decide_on=cfg.decide_on,
                          limit_setting=setting)
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
                rule, kind, thr, setting = self.limit(g.metric, g.higher_is_better)
                row = compare(rule, g.task, g.metric, g.higher_is_better, against, candidate, ref, thr, kind,
                              iters, conf, enforced=True, decide_on=cfg.decide_on, limit_setting=setting)
                if row is None:
                    notes.append(f"{g.task}.{g.metric} not evaluated on the {against}: not compared")
                else:
                    rules.append(row)
        for guard in guards:
            t = evals.targets[guard.stage]
            _, kind, thr, setting = self.limit(t.metric, t.higher_is_better)
            who = guard.who or f"{guard.stage} model" + (f" v{guard.version}" if guard.version else "")
            row = compare("earlier_target_kept", t.task, t.metric, t.higher_is_better, who, candidate,
                          guard.scores, thr, kind, iters, conf, enforced=True, decide_on=cfg.decide_on,
                          limit_setting=setting)
            if row is None:
                notes.append(f"{t.label} (the {guard.stage} stage's target) not scored on its model: not guarded")
            else:
                rules.append(row)
        if champion is None and "champion" in cfg.against:
            # None also when the candidate already is the champion (an unchanged re-run)
            notes.append("no other champion to compare with (none yet, or the candidate is the champion)")

        # Context: every other task/metric both sides were scored on (not enforced).
        enforced_keys = {(r["metric"], r["against"]) for r in rules}
        comparisons = []
        for against, ref in baselines:
            for tk in sorted(set(candidate) & set(ref)):
                for m in sorted(k for k in candidate[tk].get("samples", {}) if k in ref[tk]):
                    if (f"{tk}.{m}", against) in enforced_keys:
                        continue
                    hib = metric_info(m).higher_is_better
                    row = compare("compare", tk, m, hib, against, candidate, ref, 0.0, "improve", iters, conf,
                                  enforced=False)
                    if row is not None:
                        comparisons.append(row)

        failed = [r for r in rules if r["enforced"] and not r["passed"]]
        reasons = [describe(r) for r in failed]
        if not failed:
            n = sum(r["enforced"] for r in rules)
            line = f"all {n} enforced rule(s) passed" if n else "no rule applied"
            tr = next((r for r in rules if r["rule"] == "target_improves" and r["passed"]), None)
            if tr is not None:
                line += (f": target {tr['metric']} improved {tr['baseline']:.4g} → {tr['candidate']:.4g} "
                         f"({fmt_delta(tr['delta'], tr['unit'])})")
            if any(r["rule"] != "target_improves" for r in rules):
                line += "; no general metric fell beyond its limit"
            reasons.append(line)
        for r in rules:
            if r["flips_within_ci"]:
                reasons.append(f"not significant: the verdict on {r['metric']} vs the {r['against']} could flip "
                               f"within its {conf:.0%} CI ({fmt_delta(r['ci_low'], r['unit'])}.."
                               f"{fmt_delta(r['ci_high'], r['unit'])})")
            if not r["enforced"] and not r["passed"]:
                reasons.append(f"not enforced (gate.require_target_improvement=false): {describe(r)}")
        reasons += notes
        return GateResult(passed=not failed, reasons=reasons, rules=rules, comparisons=comparisons)


def gate(stage: str, candidate: dict, parent: dict | None, champion: dict | None, cfg, bootstrap_iters: int = 1000,
         seed: int = 0, base: dict | None = None, evals=None, uncompressed: dict | None = None,
         task_max_drop_points: float = 2.0, task_max_rise_pct: float = 5.0, guards: list[Guard] = ()) -> GateResult:
    """`Rulebook(...).judge(...)` with a GateConfig and an EvalPlan (None: the demo world's)."""
    from stagewise.evalsets import demo_plan

    book = Rulebook(cfg, evals or demo_plan(), iters=bootstrap_iters, seed=seed,
                    task_max_drop_points=task_max_drop_points, task_max_rise_pct=task_max_rise_pct)
    return book.judge(stage, candidate, parent=parent, base=base, champion=champion, uncompressed=uncompressed,
                      guards=guards)
