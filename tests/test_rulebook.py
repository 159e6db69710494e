"""The one rulebook: the same rules at every decision — a stage accepting its child, the compressor
choosing, the gate's fallback order — with units that follow the metric's kind."""

from __future__ import annotations

import copy
import math

import pytest

from stagewise.config import Config, GateConfig
from stagewise.evaluation import aggregate
from stagewise.evalsets import demo_plan
from stagewise.rulebook import Guard, Rulebook, fmt_delta, significant
from stagewise.stage import Lineage, judge_child
from test_gate import BASE_LL, acc_task, model_results, ones


def margin_task(margins: list[float]) -> dict:
    """evaluate()-shaped result of a pairs set: per-item log-likelihood margins (nats) and pairwise acc."""
    acc = [1.0 if m > 0 else 0.0 for m in margins]
    return {"margin": aggregate("margin", margins), "acc": aggregate("acc", acc), "n": len(margins),
            "doc_ids": list(range(len(margins))), "samples": {"margin": list(margins), "acc": acc}}


def with_pairs(res: dict, margins: list[float]) -> dict:
    return res | {"sw_preference": margin_task(margins)}


def book(**gate) -> Rulebook:
    return Rulebook(GateConfig(**gate), demo_plan(), iters=300)


def test_a_margin_is_judged_in_nats_never_in_points():
    parent = with_pairs(model_results(ones(20), ones(48), BASE_LL), [2.0] * 30 + [-1.0] * 30)   # margin 0.5
    child = with_pairs(model_results(ones(20), ones(48), BASE_LL), [2.5] * 30 + [-0.5] * 30)    # margin 1.0
    res = book().judge("preference", child, parent=parent)
    target = next(r for r in res.rules if r["rule"] == "target_improves")
    assert target["metric"] == "sw_preference.margin" and target["unit"] == "nats"
    assert target["delta"] == pytest.approx(0.5)                 # nats, not 50 "points"
    assert "+0.5 nats" in res.reasons[0] and "points" not in res.reasons[0]
    assert fmt_delta(0.5, "nats") == "+0.5 nats" and fmt_delta(2.5, "points") == "+2.50 points"
    assert significant(target) is True


def test_a_margin_limit_scales_with_how_far_the_pairs_are_apart_not_with_their_mean():
    # Pairs separated by ~4 nats each way: the mean margin is 0.05 nats, its 10% a limit of 0.005 nats
    # that noise crosses (what rejected the smollm2 profile's reasoning stage). The limit is 10% of the
    # mean |margin|: ~0.4 nats.
    pref = with_pairs(model_results(ones(45), ones(48), BASE_LL), [4.1] * 30 + [-4.0] * 30)    # margin 0.05
    noise = with_pairs(model_results(ones(45), ones(48), BASE_LL), [4.0] * 30 + [-4.1] * 30)   # -0.1 nats
    forgot = with_pairs(model_results(ones(45), ones(48), BASE_LL), [3.0] * 30 + [-4.0] * 30)  # -0.55 nats
    guards = [Guard("preference", "3", pref)]
    kept = book().judge("reasoning", noise, parent=pref, guards=guards)
    row = next(r for r in kept.rules if r["rule"] == "earlier_target_kept")
    assert row["delta"] == pytest.approx(-0.1) and row["threshold"] == pytest.approx(0.405)
    assert row["passed"] and kept.passed
    lost = book().judge("reasoning", forgot, parent=pref, guards=guards)
    assert [r["rule"] for r in lost.failed()] == ["earlier_target_kept"]
    assert "10% of the mean |margin| 4.05" in lost.reasons[0]
    # all pairs on one side: the mean |margin| is the margin, the limit as before
    one_way = with_pairs(model_results(ones(45), ones(48), BASE_LL), [2.0] * 60)
    row = next(r for r in book().judge("reasoning", one_way, parent=one_way, guards=[Guard("preference", "3", one_way)]).rules
               if r["rule"] == "earlier_target_kept")
    assert row["threshold"] == pytest.approx(0.2)


def test_a_later_stage_may_not_trade_away_an_earlier_stages_target():
    # SFT reached token F1 0.75; preference improves its own margin and keeps general, but F1 falls to 0.50
    pairs_before, pairs_after = [1.0] * 30 + [-1.0] * 30, [2.0] * 40 + [-1.0] * 20
    sft = with_pairs(model_results(ones(45), ones(48), BASE_LL), pairs_before)
    pref = with_pairs(model_results(ones(30), ones(48), BASE_LL), pairs_after)
    b = book()
    guards = [Guard("sft", "2", sft)]
    res = b.judge("preference", pref, parent=sft, guards=guards)
    assert not res.passed
    failed = res.failed()
    assert [(r["rule"], r["metric"], r["against"]) for r in failed] == [
        ("earlier_target_kept", "sw_instruct.token_f1", "sft model v2")]
    assert failed[0]["delta"] == pytest.approx(-25.0) and failed[0]["unit"] == "points"
    assert "undoes an earlier stage" in res.reasons[0]
    # switched off, the same numbers pass: the blind spot the rule closes
    assert book(guard_earlier_targets=False).judge("preference", pref, parent=sft,
                                                   guards=book(guard_earlier_targets=False).guards_for(
                                                       "preference", [Lineage("sft", "", "", "2", metrics=sft)])).passed


def test_a_stage_child_that_forgets_is_judged_with_the_gates_own_general_rules():
    cfg = Config()
    parent = model_results(ones(10), ones(48), BASE_LL)
    forgot = model_results(ones(40), ones(30), BASE_LL)              # target up, general MC -30 points
    init = Lineage("init", "", "k0", None, metrics={})
    pre = Lineage("pretrain", "", "k1", "1", metrics=parent)
    child = Lineage("sft", "", "k2", "2", metrics=forgot, parent_metrics=parent)
    verdict = judge_child(cfg, demo_plan(), child, [init, pre])
    assert not verdict.passed
    assert [(r["rule"], r["metric"]) for r in verdict.failed()] == [("general_no_drop", "sw_general_mc.acc")]
    kept = Lineage("sft", "", "k2", "2", metrics=model_results(ones(40), ones(47), BASE_LL), parent_metrics=parent)
    assert judge_child(cfg, demo_plan(), kept, [init, pre]).passed


def test_the_compressor_never_chooses_a_candidate_that_wins_a_second_metric_but_loses_the_target(tmp_path):
    """Planted disagreement: a candidate improves `acc` of the target set but loses its target `margin`
    beyond the limit; the compressor's check is the rulebook, so it is not eligible and never chosen."""
    from tasks.compress import select

    cfg = Config()
    cfg.compress.select.min_speed_ratio = 0.0
    b = Rulebook.of(cfg, demo_plan())
    sft = with_pairs(model_results(ones(45), ones(48), BASE_LL), [1.0] * 30 + [-1.0] * 30)
    trained = with_pairs(model_results(ones(45), ones(48), BASE_LL), [9.0] * 30 + [-1.0] * 30)   # margin 4.0
    sneaky = with_pairs(model_results(ones(45), ones(48), BASE_LL), [2.0] * 50 + [-1.0] * 10)    # acc up, margin 1.5
    honest = with_pairs(model_results(ones(45), ones(48), BASE_LL), [8.5] * 30 + [-1.0] * 30)    # margin 3.75
    assert sneaky["sw_preference"]["acc"] > trained["sw_preference"]["acc"]

    def check(res):
        v = b.judge("preference", res, parent=sft, uncompressed=trained)
        return {"passed": v.passed, "failed": [r["metric"] for r in v.failed()]}

    parent = {"method": "parent", "memory_bytes": 100, "params": 10, "tokens_per_s": 10.0,
              "tokens_per_s_batched": 10.0, "metrics": {"sw_preference/margin": 4.0}}

    def cand(name, res, size):
        return {"method": name, "memory_bytes": size, "params": 10, "tokens_per_s": 11.0, "tokens_per_s_batched": 11.0,
                "reloadable": True, "check": check(res),
                "metrics": {f"sw_preference/{m}": res["sw_preference"][m] for m in ("margin", "acc")}}

    cands = [cand("sneaky", sneaky, 20), cand("honest", honest, 50)]
    sel = select(cfg, parent, cands, task_metric="sw_preference/margin")
    assert cands[0]["failed"] == ["sw_preference.margin"] and not cands[0]["eligible"]
    assert sel["chosen"] == "honest" and "sneaky" not in sel["ranking"]
    assert "sw_preference/margin" in sel["reason"]


# ---------------------------------------------------------------- the fallback order, on a real registry
@pytest.fixture
def registered(tmp_path):
    """Two registered versions (sft v1 → preference v2) of a tiny model folder in a fresh MLflow store."""
    import mlflow

    from compress_fixtures import make_model, make_tokenizer, make_workspace
    from stagewise import registry
    from stagewise.modeling import save_model
    from stagewise.stage import RunContext

    ws = make_workspace(tmp_path / "ws")
    tok = make_tokenizer(ws, vocab_size=300)
    folder = save_model(make_model(tok, num_hidden_layers=1).eval(), tok, ws.model_dir("tiny"))
    registry.setup_tracking(ws.root)
    ctx = RunContext(run_id="test-fallback", root=ws.root, mlflow_run_id=None, registered_model="fb",
                     code_version="test")
    versions = []
    for stage in ("sft", "preference"):
        with mlflow.start_run(run_name=stage) as run:
            versions.append(registry.log_model_version(folder, "fb", stage, {"parent_version": "none"},
                                                       run.info.run_id))
    return ctx, folder, versions


def test_when_the_final_candidate_fails_the_best_one_that_passes_is_promoted(registered):
    from stagewise import registry
    from tasks.gate import gate_and_promote

    ctx, folder, (v_sft, v_pref) = registered
    cfg = Config()
    pre = model_results(ones(10), ones(48), BASE_LL)
    sft = with_pairs(model_results(ones(45), ones(48), BASE_LL), [1.0] * 30 + [-1.0] * 30)
    forgot = with_pairs(model_results(ones(45), ones(20), BASE_LL), [3.0] * 30 + [-1.0] * 30)   # MC -47 points
    lineage = [Lineage("pretrain", str(folder), "k1", None, metrics=pre),
               Lineage("sft", str(folder), "k2", v_sft, metrics=sft, parent_metrics=pre),
               Lineage("preference", str(folder), "k3", v_pref, metrics=forgot, parent_metrics=copy.deepcopy(sft))]
    out = gate_and_promote(ctx, cfg, lineage)
    gate = out["gate"]
    assert gate["passed"] and gate["fallback"]
    assert [t["candidate"]["version"] for t in gate["tried"]] == [v_pref, v_sft]
    assert not gate["tried"][0]["passed"] and "sw_general_mc.acc vs parent" in gate["tried"][0]["failed"]
    assert gate["tried"][1]["passed"]
    assert registry.alias_version("fb", registry.CHAMPION) == v_sft          # the champion moved to the sft model
    assert registry.version_tags("fb", v_pref)["gate"] == "failed"
    assert registry.version_tags("fb", v_sft)["gate"] == "passed"
    assert gate["reasons"][0].startswith("the final candidate failed; promoted the next in the fallback order")

    from stagewise.report import _tried_rows
    rows = _tried_rows(gate)
    assert [r[2] for r in rows] == ["FAIL", "PASS"] and "forgetting: sw_general_mc.acc dropped" in rows[0][3]


def test_when_no_candidate_passes_the_champion_stays(registered):
    from stagewise import registry
    from tasks.gate import gate_and_promote

    ctx, folder, (v_sft, v_pref) = registered
    pre = model_results(ones(10), ones(48), BASE_LL)
    lineage = [Lineage("pretrain", str(folder), "k1", None, metrics=pre),
               Lineage("sft", str(folder), "k2", v_sft, metrics=model_results(ones(5), ones(48), BASE_LL),
                       parent_metrics=pre)]     # the target got worse: nothing to promote
    out = gate_and_promote(ctx, Config(), lineage)
    assert not out["gate"]["passed"] and registry.alias_version("fb", registry.CHAMPION) is None
    assert [t["passed"] for t in out["gate"]["tried"]] == [False]


def test_a_target_gain_within_noise_is_marked_and_says_how_many_items_would_settle_it():
    from stagewise.stage import ci_width_note

    parent = model_results(ones(10, 40), ones(30, 40), BASE_LL[:40])
    child = model_results(ones(13, 40), ones(30, 40), BASE_LL[:40])     # +7.5 points on 40 items
    res = book().judge("sft", child, parent=parent)
    target = next(r for r in res.rules if r["rule"] == "target_improves")
    assert target["passed"] and significant(target) is False
    note = ci_width_note(target, child)
    half = note["ci_half_width"]
    import re
    need = int(re.search(r"at 40 items: ~(\d+) items would make it ±5", note["ci_note"]).group(1))
    assert half > 5 and abs(need - 40 * (half / 5) ** 2) <= 1.01
    big = model_results(ones(300, 600), ones(30, 40), BASE_LL[:40])
    wide = ci_width_note(book().judge("sft", big, parent=model_results(ones(150, 600), ones(30, 40),
                                                                         BASE_LL[:40])).rules[0], big)
    assert wide["ci_half_width"] <= 5 and "ci_note" not in wide
