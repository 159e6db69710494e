"""Distillation: the soft targets and the loss against hand-computed numbers; a real student run."""

from __future__ import annotations

import math

import pytest
import torch

from stagewise.compression.distill import distill, distill_loss, make_student, soft_targets
from stagewise.compression.measure import param_count

from compress_fixtures import compress_env  # noqa: F401  (session fixture)

# softmax((4, 2, 0) / T), worked by hand: exp values and their sum
#   T=1: e^4=54.5982, e^2=7.3891, e^0=1            sum 62.9873
#   T=2: e^2=7.3891,  e^1=2.7183, 1                sum 11.1074
#   T=4: e^1=2.7183,  e^0.5=1.6487, 1              sum  5.3670
HAND = {
    1.0: (0.86681, 0.11731, 0.01588),
    2.0: (0.66524, 0.24473, 0.09003),
    4.0: (0.50648, 0.30719, 0.18632),
}


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_soft_targets_match_hand_computed_softmax(T):
    p = soft_targets(torch.tensor([4.0, 2.0, 0.0]), T)
    assert p.tolist() == pytest.approx(HAND[T], abs=1e-4)


def test_higher_temperature_softens():
    ent = [-(p * p.log()).sum().item() for p in (soft_targets(torch.tensor([4.0, 2.0, 0.0]), T) for T in (1, 2, 4))]
    assert ent[0] < ent[1] < ent[2]


def test_distill_loss_worked_example():
    # teacher logits (4,2,0), uniform student (0,0,0), gold label 0, T=2, λ=0.5
    #   CE = -ln(1/3) = 1.09861
    #   KL(p_t^2 ‖ uniform) = Σ p ln p + ln 3 = (0.66524·ln0.66524 + 0.24473·ln0.24473 + 0.09003·ln0.09003) + 1.09861
    #                       = (-0.27112 - 0.34450 - 0.21676) + 1.09861 = 0.26623
    #   loss = 0.5·1.09861 + 0.5·4·0.26623 = 0.54931 + 0.53246 = 1.08177
    t = torch.tensor([[[4.0, 2.0, 0.0]]])
    s = torch.zeros(1, 1, 3)
    out = distill_loss(s, t, torch.tensor([[0]]), temperature=2.0, alpha=0.5, shift=False)
    assert out["ce"].item() == pytest.approx(1.09861, abs=1e-4)
    assert out["kl"].item() == pytest.approx(0.26623, abs=1e-4)
    assert out["loss"].item() == pytest.approx(1.08177, abs=1e-4)


def test_distill_loss_ignores_masked_positions_and_is_zero_for_a_perfect_copy():
    t = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3:] = -100
    out = distill_loss(t.clone(), t, labels, temperature=2.0, alpha=1.0)  # α=1: only the KL term
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    # the masked tail does not count: changing logits there changes nothing
    s = torch.randn(2, 5, 7)
    a = distill_loss(s, t, labels)["loss"].item()
    s2 = s.clone()
    s2[0, 3] += 10  # position 3 predicts label 4, which is masked (shift)
    assert distill_loss(s2, t, labels)["loss"].item() == pytest.approx(a, abs=1e-6)
    assert not math.isnan(a)


def test_student_is_at_most_half_the_teacher_and_learns(compress_env, tmp_path):
    from stagewise.compression.data import curated_texts, lm_blocks
    from stagewise.modeling import load_model, load_tokenizer, mean_nll

    ws, parent_dir, cfg = compress_env
    teacher, tok = load_model(parent_dir).eval(), load_tokenizer(parent_dir)
    texts = curated_texts(ws, tok)
    blocks = lm_blocks(tok, texts, 64, max_blocks=80)
    student0 = make_student(teacher, blocks[:8], 0.5, 0.75, 0.5, "prune")
    assert param_count(student0) <= 0.5 * param_count(teacher)
    assert student0.config.num_hidden_layers == 1 and student0.config.hidden_size == 48
    held = texts[-12:]
    before = mean_nll(student0, tok, held)
    student, info = distill(teacher, blocks, depth_factor=0.5, width_factor=0.75, mlp_factor=0.5, init="prune",
                            steps=10, lr=3e-3, batch_size=8, temperature=2.0, alpha=0.5, seed=0, bf16=False,
                            work_dir=tmp_path / "w", calib_blocks=blocks[:8])
    assert info["final_loss"] < info["first_loss"]
    assert mean_nll(student, tok, held) < before
    out = student.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == 6
