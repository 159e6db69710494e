"""compress.select: accuracy, size and latency together; objectives; the Pareto front; the reason line."""

from __future__ import annotations

import pytest

from stagewise.compression.select import pareto_front, select
from stagewise.config import Config, ConfigError, load_config
from tasks.compress import check

TASK, MC, PPL = "sw_arithmetic/exact_match", "sw_general_mc/acc", "sw_general_text/word_perplexity"


def _row(method, mem, tps, task=0.50, mc=0.60, ppl=20.0, batched=None, **extra):
    return {"method": method, "memory_bytes": mem, "bytes": mem, "params": mem, "tokens_per_s": tps,
            "tokens_per_s_batched": batched if batched is not None else tps * 4,
            "metrics": {TASK: task, MC: mc, PPL: ppl}, **extra}


def _pick(cfg, parent, cands):
    for c in cands:
        c["check"] = check(cfg, parent["metrics"], c["metrics"])
    return select(cfg, parent, cands)


PARENT = _row("parent", 100, 1000)


def test_default_never_picks_a_candidate_slower_than_its_parent():
    cfg = Config()
    cands = [_row("nf4", 25, 560), _row("distill", 41, 1530), _row("prune_structured", 68, 1045)]
    sel = _pick(cfg, PARENT, cands)
    # nf4 is the smallest, but 0.56x the parent's speed: out under the default min_speed_ratio=1.0
    assert sel["chosen"] == "distill" and sel["runner_up"] == "prune_structured"
    nf4 = cands[0]
    assert not nf4["eligible"] and "tokens_per_s 0.56x the parent < 1x" in nf4["failed"][0]
    assert sel["reason"].startswith("distill won: smallest by memory_bytes among the eligible")
    assert "2.44x smaller" in sel["reason"] and "1.53x the parent's tokens_per_s" in sel["reason"]
    assert "runner-up prune_structured" in sel["reason"]


def test_allowing_a_slowdown_picks_the_smallest_again():
    cfg = Config.model_validate({"compress": {"select": {"min_speed_ratio": 0.5}}})
    sel = _pick(cfg, PARENT, [_row("nf4", 25, 560), _row("distill", 41, 1530)])
    assert sel["chosen"] == "nf4" and sel["runner_up"] == "distill"


def test_memory_ceiling_and_speed_on_the_batched_figure():
    cfg = Config.model_validate({"compress": {"select": {"max_memory_mb": 0.00005, "speed_by": "tokens_per_s_batched"}}})
    # distill is fast at batch 1 but slower than the parent batched; the ceiling is 50 bytes
    cands = [_row("distill", 41, 1530, batched=3000), _row("tiny", 30, 1100), _row("prune", 60, 1050)]
    sel = _pick(cfg, PARENT, cands)
    assert sel["chosen"] == "tiny"
    assert any("tokens_per_s_batched 0.75x" in f for f in cands[0]["failed"])
    assert any("memory" in f and "max_memory_mb" in f for f in cands[2]["failed"])


def test_planted_ten_point_task_loss_is_never_chosen_whatever_the_objective():
    bad = dict(task=0.40)                                  # -10 points on the task
    for objective in ("smallest", "fastest", "pareto"):
        cfg = Config.model_validate({"compress": {"select": {"objective": objective}}})
        cands = [_row("distill+nf4", 10, 5000, **bad), _row("prune_structured", 70, 1100)]
        sel = _pick(cfg, PARENT, cands)
        assert sel["chosen"] == "prune_structured", objective
        assert cands[0]["failed"] == [f"{TASK}: drop points 10.00 > 2.0"]
    # alone, it leaves nothing to ship: the parent ships and the reason says why
    sel = _pick(Config(), PARENT, [_row("distill+nf4", 10, 5000, **bad)])
    assert sel["chosen"] is None and "uncompressed parent ships" in sel["reason"] and "drop points 10.00" in sel["reason"]


def test_objectives_fastest_and_pareto():
    cands = lambda: [_row("a", 30, 1100), _row("b", 50, 2500), _row("c", 60, 1200)]  # noqa: E731  c is dominated by b
    assert _pick(Config.model_validate({"compress": {"select": {"objective": "fastest"}}}), PARENT, cands())["chosen"] == "b"
    cfg = Config.model_validate({"compress": {"select": {"objective": "pareto", "size_weight": 1, "speed_weight": 1}}})
    sel = _pick(cfg, PARENT, cands())
    # a: log(100/30)+log(1.1)=1.30; b: log(2)+log(2.5)=1.61
    assert sel["chosen"] == "b" and "c" not in sel["front"] and {"a", "b"} <= set(sel["front"])
    cfg = Config.model_validate({"compress": {"select": {"objective": "pareto", "size_weight": 1, "speed_weight": 0}}})
    assert _pick(cfg, PARENT, cands())["chosen"] == "a"


def test_a_candidate_that_does_not_reload_as_measured_is_not_shippable():
    cands = [_row("dynamic_int8", 20, 1200, reloadable=False, reload_error="recipe folder"), _row("distill", 41, 1500)]
    sel = _pick(Config(), PARENT, cands)
    assert sel["chosen"] == "distill" and cands[0]["failed"] == ["not shippable: recipe folder"]


def test_pareto_front_on_size_and_speed():
    rows = [PARENT, _row("a", 30, 900), _row("b", 50, 2500), _row("c", 60, 1200), _row("d", 30, 800)]
    assert sorted(pareto_front(rows, "memory_bytes", "tokens_per_s")) == ["a", "b"]


@pytest.mark.parametrize("bad, words", [
    ({"methods": ["nf4+distill"]}, "quantization must be the last link"),
    ({"methods": ["distill+nf3"]}, "unknown method 'nf3'"),
    ({"methods": ["distill+merge"]}, "merge can only be the first link"),
    ({"methods": ["distill+distill"]}, "appears twice"),
    ({"select": {"min_speed_ratio": -1}}, "min_speed_ratio"),
    ({"select": {"objective": "cheapest"}}, "objective"),
    ({"select": {"objective": "pareto", "size_weight": 0, "speed_weight": 0}}, "size_weight or speed_weight"),
    ({"select": {"max_memory_mb": 0}}, "max_memory_mb"),
])
def test_select_and_chain_settings_are_validated_with_a_clear_message(tmp_path, bad, words):
    import yaml

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"compress": bad}))
    with pytest.raises(ConfigError, match="compress") as e:
        load_config(p)
    assert words in str(e.value)


def test_chains_are_normalised():
    cfg = Config.model_validate({"compress": {"methods": ["distill + nf4", "prune_structured+int8"]}})
    assert cfg.compress.methods == ["distill+nf4", "prune_structured+int8"]
