"""Stage recipes that do not assume the demo world: GRPO's zero-variance stop and its warm start."""

from __future__ import annotations

from types import SimpleNamespace

from stage_fixtures import curated, pretrained, smoke_cfg
from stagewise.modeling import load_parent
from tasks.reasoning import load_problems, warm_start, zero_variance_stop


def _log(cb, step: int, frac: float):
    control = SimpleNamespace(should_training_stop=False)
    cb.on_log(None, SimpleNamespace(global_step=step), control, logs={"frac_reward_zero_std": frac})
    return control.should_training_stop


def test_zero_variance_groups_stop_grpo_and_say_why():
    cb = zero_variance_stop(steps=20, max_share=0.9)
    assert not _log(cb, 10, 1.0)            # not decided before `steps`
    assert _log(cb, 20, 0.95)               # mean 0.975 >= 0.9: stop
    assert "98% of reward groups had zero variance" in cb.reason and "warm_start" in cb.reason   # 0.975 shown as 98%


def test_groups_with_variance_keep_training():
    cb = zero_variance_stop(steps=20, max_share=0.9)
    assert not _log(cb, 10, 1.0) and not _log(cb, 20, 0.5)   # mean 0.75
    assert cb.reason is None
    assert not _log(cb, 30, 1.0)            # decided once, at the first log past `steps`


def test_warm_start_lifts_a_parent_that_solves_nothing(tmp_path):
    """The pretrained smoke model has never seen "The answer is N.": GRPO's groups would all be wrong."""
    cfg = smoke_cfg("reasoning.warm_start_below=0.2", "reasoning.warm_start_probe=16", "reasoning.sft_epochs=3")
    parent = pretrained()[0]
    model, tok = load_parent(cfg, parent)
    model, tok, report = warm_start(cfg, parent, curated(), tmp_path / "reasoning", model, tok)
    assert report["ran"] is True and report["solve_rate_before"] < 0.2
    assert report["solve_rate_after"] > report["solve_rate_before"]
    print("warm start:", report)
    assert report["problems"] == round(cfg.reasoning.warm_start_share * len(load_problems(curated())))
    # a parent above the threshold is left alone
    _, _, again = warm_start(smoke_cfg("reasoning.warm_start_below=0.0001"), parent, curated(),
                             tmp_path / "r2", model, tok)
    assert again is None or again["ran"] is False
