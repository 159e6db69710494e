"""stagewise/ppo.py: each PPO piece against hand-worked numbers, then a toy run that must move."""

from __future__ import annotations

import math

import pytest
import torch

from stage_fixtures import sft_model, smoke_cfg
from stagewise.config import PPOConfigSection
from stagewise.modeling import load_parent, prompt_ids
from stagewise.ppo import (
    clipped_surrogate, clipped_value_loss, gae, kl_penalized_rewards, ppo_train, whiten,
)


def test_gae_worked_example():
    # γ=1, λ=0.5: δ2 = 1 − 0.7 = 0.3; δ1 = 0.7 − 0.6 = 0.1; δ0 = 0.6 − 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.5·0.3 = 0.25; A0 = 0.1 + 0.5·0.25 = 0.225
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.5)
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])


def test_gae_ignores_padding_after_the_end():
    # γ=0.9, λ=0.8; the padded value 9.0 must not leak backwards.
    # A1 = 1 − 0.6 = 0.4; A0 = (0.9·0.6 − 0.5) + 0.72·0.4 = 0.04 + 0.288 = 0.328
    adv, ret = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 9.0]]),
                   torch.tensor([[1.0, 1.0, 0.0]]), 0.9, 0.8)
    assert adv.tolist()[0] == pytest.approx([0.328, 0.4, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.828, 1.0, 0.0])


def test_clipped_surrogate_worked_example():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipfrac = clipped_surrogate(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # per token max(−A·r, −A·clip(r)): −1.2 (clipped), 1.5, −0.5, 0.8 (clipped) → mean 0.15
    assert loss.item() == pytest.approx(0.15)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    # no gradient through the clipped tokens; ∂/∂logp = −A·r/4 elsewhere
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.375, -0.125, 0.0])


def test_clipped_value_loss_worked_example():
    v, old, ret = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    # t0: max(1², 0.2²) = 1 ; t1: max(0.5², (0.8 − 1)²) = 0.25 → 0.5 · 1.25 / 2
    assert clipped_value_loss(v, old, ret, torch.ones(1, 2), 0.2).item() == pytest.approx(0.3125)


def test_kl_penalty_and_score_on_last_token():
    r = kl_penalized_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0, -3.0]]),
                             torch.tensor([[-1.5, -2.0, -2.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.1)
    assert r.tolist()[0] == pytest.approx([-0.05, 2.0, 0.0])


def test_whiten_over_valid_tokens():
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, :3].pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert w[0, 3].item() == 0.0


def test_ppo_raises_a_toy_reward():
    """Reward = share of completion tokens that are the token for ' red': PPO must raise it."""
    model, tok = load_parent(smoke_cfg(), sft_model()[0])
    target = tok(" red", add_special_tokens=False).input_ids[-1]
    prompts = [prompt_ids(tok, q) for q in ["What color is the fox?", "What color is the owl?",
                                            "Which color does the bear have?", "What color is the frog?"]]

    def reward(_prompts, completions):
        return [sum(t == target for t in c) / max(len(c), 1) * 4 for c in completions]

    out = ppo_train(model, tok, reward, prompts, PPOConfigSection(steps=12, batch_size=16, minibatch_size=8,
                                                              learning_rate=3e-3, kl_coef=0.01, max_new_tokens=8))
    h = out["history"]
    first, last = sum(r["score"] for r in h[:3]) / 3, sum(r["score"] for r in h[-3:]) / 3
    assert last > first + 0.2, (first, last)
    assert all(math.isfinite(r["kl"]) for r in h)
