"""One metrics table: evaluation, the gate and compression read the same directions and units."""

from __future__ import annotations

from stagewise.evalsets import KINDS, demo_plan
from stagewise.evaluation import aggregate
from stagewise.metrics import metric
from stagewise.compression.select import _delta, lower_is_better
from tasks.gate import relative


def test_lookups_by_any_spelling_agree():
    for name in ("word_perplexity", "sw_general_text.word_perplexity", "sw_general_text/word_perplexity",
                 "word_perplexity,none"):
        m = metric(name)
        assert (m.higher_is_better, m.kind, m.ratio) == (False, "perplexity", True), name
    assert metric("general_nll").kind == "loss" and not metric("general_nll").higher_is_better
    assert metric("sw_arithmetic_sampled.pass1").higher_is_better
    assert metric("some_new_score").higher_is_better      # lm-eval's default for an unknown metric


def test_gate_compress_and_evaluation_read_the_same_directions():
    for name in ("word_perplexity", "bits_per_byte", "nll", "acc", "token_f1", "margin", "pass1"):
        m = metric(name)
        assert lower_is_better(f"task/{name}") is (not m.higher_is_better), name
        assert relative(name, m.higher_is_better) is m.relative, name
    # nll: compress compared it as a loss, the gate as an accuracy before the table (issue #14)
    assert relative("nll", metric("nll").higher_is_better) and lower_is_better("general_nll")
    p = demo_plan()
    for m in [*p.targets.values(), *p.general]:
        assert m.higher_is_better is metric(m.metric).higher_is_better
    for kind in KINDS.values():                 # every metric a declared set can be judged on
        for name, hib in kind["metrics"].items():
            assert hib is metric(name).higher_is_better, name


def test_units_of_a_change_follow_the_kind():
    kind, rise = _delta("sw_general_text/word_perplexity", 10.0, 11.0)
    assert kind == "rise_pct" and round(rise, 9) == 10.0
    assert _delta("sw_general_mc/acc", 0.99, 0.96)[0] == "drop_points"
    assert round(_delta("sw_general_mc/acc", 0.99, 0.96)[1], 6) == 3.0
    assert _delta("sw_preference/margin", 150.0, 140.0) == ("drop_points", 10.0)   # margins: own units
    # word perplexity aggregates as a ratio of sums over (loglikelihood, count) pairs, not a mean
    assert round(aggregate("word_perplexity", [(-2.0, 1), (-4.0, 3)]), 6) == round(2.718281828 ** 1.5, 6)
