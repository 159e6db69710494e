"""The forgetting guard at the function level: rules, bootstrap CIs, the planted-forgetting case."""

from __future__ import annotations

import json
import math
import random

import pytest

from stagewise.config import GateConfig
from stagewise.evaluation import aggregate
from tasks.gate import bootstrap_delta_ci, gate


def acc_task(metric: str, correct: list[int]) -> dict:
    """An evaluate()-shaped result for an accuracy-like metric from per-item 0/1 scores."""
    items = [float(x) for x in correct]
    return {metric: aggregate(metric, items), "n": len(items), "doc_ids": list(range(len(items))),
            "samples": {metric: items}}


def ppl_task(logliks: list[float], words: int = 50) -> dict:
    items = [[ll, words] for ll in logliks]
    return {"word_perplexity": aggregate("word_perplexity", items), "n": len(items),
            "doc_ids": list(range(len(items))), "samples": {"word_perplexity": items}}


def model_results(instruct: list[int], mc: list[int], logliks: list[float]) -> dict:
    return {"sw_instruct": acc_task("token_f1", instruct), "sw_general_mc": acc_task("acc", mc),
            "sw_general_text": ppl_task(logliks)}


def ones(n_right: int, n: int = 60) -> list[int]:
    return [1] * n_right + [0] * (n - n_right)


BASE_LL = [-150.0 - (i % 7) for i in range(60)]   # ~ exp(3.06) ≈ 21 word perplexity


def test_planted_forgetting_fails_and_names_the_general_metric():
    parent = model_results(ones(10), ones(48), BASE_LL)           # mc acc 0.80
    candidate = model_results(ones(45), ones(24), BASE_LL)        # target up, mc acc 0.80 → 0.40
    res = gate("sft", candidate, parent, None, GateConfig(), bootstrap_iters=500)

    assert not res.passed
    target = next(r for r in res.rules if r["rule"] == "target_improves")
    assert target["passed"] and target["metric"] == "sw_instruct.token_f1"
    drop = next(r for r in res.rules if r["metric"] == "sw_general_mc.acc")
    assert drop["rule"] == "general_no_drop" and not drop["passed"]
    assert drop["delta"] == pytest.approx(-40.0)
    assert drop["ci_high"] < -3.0 and drop["flips_within_ci"] is False   # a real drop, not noise
    assert "sw_general_mc.acc" in res.reasons[0] and "dropped" in res.reasons[0]   # the culprit, first
    ppl = next(r for r in res.rules if r["metric"] == "sw_general_text.word_perplexity")
    assert ppl["passed"] and ppl["delta"] == pytest.approx(0.0)


def test_perplexity_rise_beyond_limit_fails_small_rise_passes():
    parent = model_results(ones(10), ones(48), BASE_LL)
    worse = model_results(ones(40), ones(48), [ll * 1.2 for ll in BASE_LL])   # ppl^1.2: far above +10 %
    slight = model_results(ones(40), ones(48), [ll * 1.005 for ll in BASE_LL])  # ~ +1.5 %
    cfg = GateConfig(perplexity_max_rise_pct=10.0)

    bad = gate("sft", worse, parent, None, cfg, bootstrap_iters=300)
    assert not bad.passed
    row = next(r for r in bad.rules if r["metric"] == "sw_general_text.word_perplexity")
    assert row["rule"] == "general_ppl_rise" and row["unit"] == "%" and row["delta"] > 10
    assert any("sw_general_text.word_perplexity" in r and "rose" in r for r in bad.reasons)

    ok = gate("sft", slight, parent, None, cfg, bootstrap_iters=300)
    assert ok.passed, ok.reasons
    row = next(r for r in ok.rules if r["metric"] == "sw_general_text.word_perplexity")
    expected = 100 * (math.exp(-sum(BASE_LL) * 1.005 / (50 * 60)) / math.exp(-sum(BASE_LL) / (50 * 60)) - 1)
    assert row["delta"] == pytest.approx(expected)


def test_champion_comparison_catches_what_the_parent_comparison_misses():
    champion = model_results(ones(30), ones(54), BASE_LL)   # mc 0.90
    parent = model_results(ones(10), ones(45), BASE_LL)     # mc 0.75: the parent already forgot
    candidate = model_results(ones(40), ones(45), BASE_LL)  # no drop vs parent, -15 points vs champion
    res = gate("sft", candidate, parent, champion, GateConfig(), bootstrap_iters=300)
    assert not res.passed
    failed = [r for r in res.rules if not r["passed"]]
    assert [(r["metric"], r["against"]) for r in failed] == [("sw_general_mc.acc", "champion")]
    assert any("vs the champion" in r for r in res.reasons)


def test_forgetting_spread_over_stages_is_caught_against_the_base():
    # The candidate loses 1.7 points vs its parent (within the 3-point limit) but 5 since pretraining.
    pretrain = model_results(ones(10), ones(54), BASE_LL)    # mc 0.90
    parent = model_results(ones(20), ones(52), BASE_LL)      # sft: mc 0.867
    candidate = model_results(ones(30), ones(51), BASE_LL)   # preference: mc 0.85
    cfg = GateConfig()
    res = gate("sft", candidate, parent, None, cfg, bootstrap_iters=300, base=pretrain)
    assert not res.passed
    failed = [(r["metric"], r["against"]) for r in res.rules if not r["passed"]]
    assert failed == [("sw_general_mc.acc", "base")]
    assert "vs the base" in res.reasons[0]
    # Without the base in gate.against, the same numbers pass: the blind spot the rule closes.
    assert gate("sft", candidate, parent, None, cfg.model_copy(update={"against": ["parent", "champion"]}),
                bootstrap_iters=300, base=pretrain).passed


def test_gate_against_must_name_known_baselines():
    with pytest.raises(ValueError):
        GateConfig(against=["parent", "grandparent"])


def test_target_must_improve_and_noise_is_flagged():
    parent = model_results(ones(20), ones(48), BASE_LL)
    same = model_results(ones(20), ones(48), BASE_LL)
    res = gate("sft", same, parent, None, GateConfig(), bootstrap_iters=300)
    assert not res.passed and "did not improve" in res.reasons[0]

    # One more item right out of 60: "improved", but a resample can easily undo it.
    rng = random.Random(0)
    noisy = ones(21)
    rng.shuffle(noisy)
    barely = model_results(noisy, ones(48), BASE_LL)
    res = gate("sft", barely, parent, None, GateConfig(), bootstrap_iters=500)
    target = next(r for r in res.rules if r["rule"] == "target_improves")
    assert target["passed"] and target["flips_within_ci"] is True
    assert target["ci_low"] <= 0 < target["ci_high"]
    assert any("could flip" in r and "sw_instruct.token_f1" in r for r in res.reasons)

    big = model_results(ones(50), ones(48), BASE_LL)
    target = next(r for r in gate("sft", big, parent, None, GateConfig(), 500).rules if r["rule"] == "target_improves")
    assert target["passed"] and target["flips_within_ci"] is False and target["ci_low"] > 0


def test_target_rule_can_be_reported_without_enforcing():
    parent = model_results(ones(20), ones(48), BASE_LL)
    res = gate("sft", model_results(ones(15), ones(48), BASE_LL), parent, None,
               GateConfig(require_target_improvement=False), bootstrap_iters=200)
    assert res.passed
    assert any(r.startswith("not enforced") and "sw_instruct.token_f1" in r for r in res.reasons)


def test_missing_general_metric_on_candidate_fails():
    parent = model_results(ones(10), ones(48), BASE_LL)
    candidate = model_results(ones(40), ones(48), BASE_LL)
    del candidate["sw_general_mc"]
    res = gate("sft", candidate, parent, None, GateConfig(), bootstrap_iters=100)
    assert not res.passed
    assert any("sw_general_mc.acc was not evaluated on the candidate" in r for r in res.reasons)


def test_first_model_has_nothing_to_improve_on_and_result_serializes():
    cand = model_results(ones(10), ones(48), BASE_LL)
    res = gate("pretrain", cand, None, None, GateConfig(), bootstrap_iters=100)
    assert res.passed and res.rules == []
    assert any("first model" in r for r in res.reasons)
    d = json.loads(json.dumps(res.to_dict()))
    assert set(d) >= {"passed", "reasons", "rules", "comparisons"}


def test_paired_ci_of_identical_models_is_zero_and_contains_the_delta():
    a = acc_task("acc", ones(30))
    lo, hi, paired = bootstrap_delta_ci("acc", False, a, a, 200, 0.95)
    assert paired and lo == hi == 0.0
    b = acc_task("acc", ones(40))
    lo, hi, paired = bootstrap_delta_ci("acc", False, b, a, 1000, 0.95)
    assert lo <= 100 * (40 - 30) / 60 <= hi and lo > 0
    # Pairing matters: items move together, so the paired CI is narrower than an unpaired one.
    b_unpaired = dict(b, doc_ids=[i + 1000 for i in b["doc_ids"]])
    ulo, uhi, upaired = bootstrap_delta_ci("acc", False, b_unpaired, a, 1000, 0.95)
    assert not upaired and (uhi - ulo) > (hi - lo)


def test_decide_on_ci_acts_only_on_evidence():
    parent = model_results(ones(20), ones(48), BASE_LL)
    rng = random.Random(1)
    plus_one = ones(21)
    rng.shuffle(plus_one)
    cand = model_results(plus_one, ones(46), BASE_LL)   # target +1 item, general mc -2 items (-3.33 points)
    est = gate("sft", cand, parent, None, GateConfig(), bootstrap_iters=500)
    ci = gate("sft", cand, parent, None, GateConfig(decide_on="ci"), bootstrap_iters=500)

    def rule(res, name):
        return next(r for r in res.rules if r["rule"] == name)
    # point estimate: the target improved, and 3.33 points is past the 3-point limit
    assert rule(est, "target_improves")["passed"] and not rule(est, "general_no_drop")["passed"]
    # evidence: neither the gain nor the drop is outside the noise
    assert not rule(ci, "target_improves")["passed"] and rule(ci, "general_no_drop")["passed"]
    assert not ci.passed and "within noise" in ci.reasons[0]
    # a drop that is far outside the noise still fails under ci
    forgot = model_results(ones(50), ones(20), BASE_LL)
    res = gate("sft", forgot, parent, None, GateConfig(decide_on="ci"), bootstrap_iters=500)
    assert not res.passed and "sw_general_mc.acc" in res.reasons[0] and rule(res, "target_improves")["passed"]


def test_a_drop_of_exactly_the_limit_is_within_it():
    """0.99 → 0.96 on 100 items is a 3-point drop, not 3.0000000000000027 (the default limit is 3)."""
    parent = {"sw_general_mc": acc_task("acc", ones(99, 100)), "sw_instruct": acc_task("token_f1", ones(10, 100))}
    at_limit = {"sw_general_mc": acc_task("acc", ones(96, 100)), "sw_instruct": acc_task("token_f1", ones(20, 100))}
    beyond = {"sw_general_mc": acc_task("acc", ones(95, 100)), "sw_instruct": acc_task("token_f1", ones(20, 100))}
    row = lambda res: next(r for r in res.rules if r["metric"] == "sw_general_mc.acc")  # noqa: E731
    ok = gate("sft", at_limit, parent, None, GateConfig(), bootstrap_iters=200)
    assert row(ok)["delta"] == pytest.approx(-3.0) and row(ok)["passed"] and ok.passed
    bad = gate("sft", beyond, parent, None, GateConfig(), bootstrap_iters=200)
    assert not row(bad)["passed"] and not bad.passed


def test_a_compressed_candidate_is_judged_against_the_uncompressed_model_too():
    trained_parent = model_results(ones(10), ones(48), BASE_LL)     # what the stage had to beat
    uncompressed = model_results(ones(40), ones(48), BASE_LL)       # target 0.67
    kept = model_results(ones(39), ones(48), BASE_LL)               # -1.7 points: within the 2-point limit
    res = gate("sft", kept, trained_parent, None, GateConfig(), bootstrap_iters=200, uncompressed=uncompressed)
    assert res.passed
    cost = next(r for r in res.rules if r["rule"] == "task_within_limit")
    assert cost["against"] == "uncompressed" and cost["delta"] == pytest.approx(-100 / 60) and cost["threshold"] == 2.0
    assert {r["against"] for r in res.rules if r["rule"] == "general_no_drop"} == {"parent", "uncompressed"}
    # planted: the compressed model lost 10 points vs the uncompressed one, though it still beats the
    # training parent — the gate fails it and says why
    lost = model_results(ones(34), ones(48), BASE_LL)
    res = gate("sft", lost, trained_parent, None, GateConfig(), bootstrap_iters=200, uncompressed=uncompressed)
    assert not res.passed
    assert res.reasons[0].startswith("compression cost: target sw_instruct.token_f1 dropped 10.00 points")
    assert next(r for r in res.rules if r["rule"] == "target_improves")["passed"]
