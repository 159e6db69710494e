"""Compact PPO for RLHF (TRL 1.16 removed its PPOTrainer, so this is ours).

The classic recipe (Ziegler et al. 2019; Ouyang et al. 2022; the "N implementation details of RLHF
with PPO" write-up): sample completions from the policy → score them with the reward model → per-token
reward = −β·(log π − log π_ref) with the score added on the last completion token → GAE advantages
from a value head → several epochs of minibatch updates of the clipped surrogate + clipped value loss.
Each piece is a small pure function with unit tests against worked numbers (tests/test_ppo.py).
"""

from __future__ import annotations

import copy
import random
import time
from stagewise.config import PPOConfigSection

import torch
import torch.nn as nn


# ---------------------------------------------------------------- the pieces (unit-tested)
def kl_penalized_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: −kl_coef·(logp − ref_logp) on every completion token, plus the
    sequence score on its last valid token. mask is 1 on completion tokens."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.long().cumsum(1).argmax(1)   # index of the last 1 in each row
    rewards[torch.arange(len(score)), last] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [B, T] (Schulman et al. 2016).

    δ_t = r_t + γ·V_{t+1} − V_t ;  A_t = δ_t + γλ·A_{t+1} ; V after the last valid token is 0.
    Returns (advantages, returns = advantages + values), both zero outside the mask."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # padding after the end passes nothing backwards
        next_value = values[:, t] * m
        next_adv = a * m
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalize advantages over the valid tokens of the batch."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                      clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO policy loss: mean over tokens of max(−A·r, −A·clip(r, 1±ε)), r = exp(logp − old_logp).
    Returns (loss, fraction of tokens where the clip was active)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    n = mask.sum().clamp(min=1)
    loss = (torch.max(unclipped, clipped) * mask).sum() / n
    clipfrac = ((clipped > unclipped).float() * mask).sum() / n
    return loss, clipfrac


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """0.5·max((V − R)², (clip(V, V_old ± ε) − R)²), averaged over valid tokens."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- policy with a value head
class PolicyWithValue(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (shared trunk)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) aligned to positions 1..T-1 → [B, T-1]."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]


# ---------------------------------------------------------------- the loop
def ppo_train(policy_lm, tok, reward_fn, prompts: list[list[int]], s: PPOConfigSection, seed: int = 0,
              log=print) -> dict:
    """Optimize `policy_lm` in place against reward_fn(list[prompt_ids], list[completion_ids]) → [B] scores.

    `prompts` are chat-templated prompt token ids. The reference is a frozen copy of the starting policy."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    ref = copy.deepcopy(policy_lm).eval().requires_grad_(False)
    model = PolicyWithValue(policy_lm)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate, eps=1e-6)
    pad = tok.pad_token_id
    from stagewise.chat import stop_token_ids

    stop = stop_token_ids(tok)
    history = []
    t0 = time.perf_counter()
    for step in range(s.steps):
        batch = [prompts[rng.randrange(len(prompts))] for _ in range(s.batch_size)]
        # ---- rollout: left-padded prompts, sampled completions
        P = max(len(p) for p in batch)
        ids = torch.full((len(batch), P), pad)
        att = torch.zeros((len(batch), P), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, P - len(p):] = torch.tensor(p)
            att[i, P - len(p):] = 1
        model.eval()
        with torch.no_grad():
            gen = policy_lm.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=s.temperature,
                                     top_k=0, top_p=1.0, max_new_tokens=s.max_new_tokens,
                                     pad_token_id=pad, eos_token_id=stop)
        comp = gen[:, P:]
        # completion mask: tokens up to and including the first end token (the template's end of turn)
        is_eos = torch.isin(comp, torch.tensor(stop))
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        cmask = (~after_eos).long()
        full_att = torch.cat([att, cmask], 1)
        seq = torch.where(full_att.bool(), gen, torch.full_like(gen, pad))
        completions = [c[m.bool()].tolist() for c, m in zip(comp, cmask)]
        with torch.no_grad():
            scores = torch.as_tensor(reward_fn(batch, completions), dtype=torch.float32)
            logits, values = model(seq, full_att)
            old_logp = token_logprobs(logits, seq)[:, P - 1:]
            ref_logp = token_logprobs(ref(input_ids=seq, attention_mask=full_att).logits, seq)[:, P - 1:]
            old_values = values[:, P - 1:-1]   # value of the state before each completion token
            mask = cmask.float()
            rewards = kl_penalized_rewards(scores, old_logp, ref_logp, mask, s.kl_coef)
            adv, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
            adv = whiten(adv, mask)
        # ---- update: ppo_epochs × minibatches
        model.train()
        stats = []
        for _ in range(s.ppo_epochs):
            order = torch.randperm(len(batch))
            for j in range(0, len(batch), s.minibatch_size):
                mb = order[j:j + s.minibatch_size]
                logits, values = model(seq[mb], full_att[mb])
                logp = token_logprobs(logits, seq[mb])[:, P - 1:]
                pg, clipfrac = clipped_surrogate(logp, old_logp[mb], adv[mb], mask[mb], s.clip)
                vf = clipped_value_loss(values[:, P - 1:-1], old_values[mb], returns[mb], mask[mb], s.clip)
                loss = pg + s.vf_coef * vf
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                stats.append((pg.item(), vf.item(), clipfrac.item()))
        kl = ((old_logp - ref_logp) * mask).sum(1).mean().item()
        row = {"step": step + 1, "score": scores.mean().item(), "kl": kl,
               "pg_loss": sum(x[0] for x in stats) / len(stats), "vf_loss": sum(x[1] for x in stats) / len(stats),
               "clipfrac": sum(x[2] for x in stats) / len(stats), "tokens": int(mask.sum())}
        history.append(row)
        dt = time.perf_counter() - t0
        log(f"[preference/ppo] step {step + 1}/{s.steps} score {row['score']:.3f} kl {kl:.3f} "
            f"pg {row['pg_loss']:.4f} vf {row['vf_loss']:.4f} clipfrac {row['clipfrac']:.3f} "
            f"tokens/s {sum(h['tokens'] for h in history) / dt:,.0f}")
    policy_lm.eval()
    return {"history": history, "value_head": model.value_head.state_dict()}
