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
    # it is SFT, so SFT's replay comes along (corpus documents, loss on every token), and held-out
    # general text is measured before GRPO would start
    assert report["replayed_documents"] == round(cfg.sft.replay_ratio * report["problems"]) > 0
    assert report["general_texts"] > 0 and isinstance(report["general_ppl_rise_pct"], float)
    # a parent above the threshold is left alone
    _, _, again = warm_start(smoke_cfg("reasoning.warm_start_below=0.0001"), parent, curated(),
                             tmp_path / "r2", model, tok)
    assert again is None or again["ran"] is False


def test_a_warm_start_that_forgets_is_undone_and_a_lora_one_follows_sft_peft(tmp_path):
    """With no replay, a high learning rate and a 0% perplexity allowance the warm start hurts general text
    beyond the gate's limit: GRPO gets the parent back, unchanged. With sft.peft=lora it trains an adapter
    (merged), leaving the parent model it was given untouched."""
    import torch

    parent = pretrained()[0]
    cfg = smoke_cfg("reasoning.warm_start_below=1.0", "reasoning.warm_start_probe=8", "reasoning.sft_epochs=1",
                    "sft.replay_ratio=0", "sft.learning_rate=0.05", "reasoning.warm_start_max_ppl_rise_pct=0")
    model, tok = load_parent(cfg, parent)
    w0 = model.model.embed_tokens.weight.detach().clone()
    back, _, report = warm_start(cfg, parent, curated(), tmp_path / "reasoning", model, tok)
    assert report["ran"] and report["replayed_documents"] == 0 and report["general_ppl_rise_pct"] > 0
    assert "GRPO starts from the parent" in report["undone"]
    assert not torch.equal(model.model.embed_tokens.weight, w0)                # it did train (in place) ...
    assert torch.equal(back.model.embed_tokens.weight, w0)                     # ... and GRPO gets the parent

    cfg = smoke_cfg("reasoning.warm_start_below=1.0", "reasoning.warm_start_probe=8", "reasoning.sft_epochs=1",
                    "sft.peft=lora", "reasoning.warm_start_max_ppl_rise_pct=1000")
    model, tok = load_parent(cfg, parent)
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    out, _, report = warm_start(cfg, parent, curated(), tmp_path / "r-lora", model, tok)
    assert report["peft"] == "lora" and "undone" not in report
    assert not torch.equal(out.model.layers[0].mlp.up_proj.weight, w0)         # the merged adapter moved it
    assert type(out.model.layers[0].mlp.up_proj) is torch.nn.Linear           # merged: a plain model again
    assert not any("lora" in n for n, _ in out.named_parameters())
    # GRPO fine-tunes every weight of what the warm start hands over: LoRA froze the base, merging does
    # not thaw it (the smollm2 run crashed in GRPO: "element 0 of tensors does not require grad")
    assert all(p.requires_grad for p in out.parameters())
