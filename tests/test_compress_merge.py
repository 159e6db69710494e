"""Merging through mergekit: the arithmetic on one-weight examples, and a real merge that runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagewise.compression.merge import merge_config, merge_models

CFG = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=True)


def _const_model(path: Path, value: float, special: tuple[float, float] | None = None) -> Path:
    """Every weight = value; optionally the first two entries of the first MLP weight set apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(**CFG))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
        if special is not None:
            m.model.layers[0].mlp.up_proj.weight.view(-1)[:2] = torch.tensor(special)
    m.save_pretrained(path)
    return path


def _weights(folder: Path) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return m.model.layers[0].mlp.up_proj.weight.detach().view(-1)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    # one-weight world: base 0.50, code 0.80, math 0.40 (τ_code = +0.30, τ_math = -0.10);
    # entries 0/1 of up_proj: base 0, A (+0.3, -0.2), B (-0.1, -0.4) for a per-entry sign election
    return {
        "base": _const_model(d / "base", 0.5, (0.0, 0.0)),
        "code": _const_model(d / "code", 0.8, (0.3, -0.2)),
        "math": _const_model(d / "math", 0.4, (-0.1, -0.4)),
        "dir": d,
    }


def test_task_arithmetic_adds_task_vectors(three):
    out = merge_models("task_arithmetic", [three["code"], three["math"]], three["dir"] / "ta", base=three["base"])
    w = _weights(out)
    assert w[5].item() == pytest.approx(0.70, abs=1e-6)      # 0.5 + 0.3 - 0.1
    assert w[:2].tolist() == pytest.approx([0.2, -0.6], abs=1e-6)


def test_ties_elects_the_majority_sign_and_averages_agreeing_entries(three):
    out = merge_models("ties", [three["code"], three["math"]], three["dir"] / "ties", base=three["base"], density=1.0)
    w = _weights(out)
    assert w[5].item() == pytest.approx(0.80, abs=1e-6)      # + side wins (0.3 vs 0.1): only τ_code kept
    assert w[0].item() == pytest.approx(0.3, abs=1e-6)       # (+0.3, -0.1) → + elected → 0.3
    assert w[1].item() == pytest.approx(-0.3, abs=1e-6)      # (-0.2, -0.4) agree → mean -0.3


def test_ties_trims_small_task_vector_entries(three):
    # density 0.5 keeps each task vector's top half by magnitude. Entry 1: code's -0.2 is its smallest
    # entry (trimmed), math's -0.4 its largest (kept) → merged -0.4, where density 1.0 gave -0.3.
    out = merge_models("ties", [three["code"], three["math"]], three["dir"] / "ties_d", base=three["base"], density=0.5)
    assert _weights(out)[1].item() == pytest.approx(-0.4, abs=1e-6)


def test_linear_soup_and_slerp_average(three):
    lin = _weights(merge_models("linear", [three["code"], three["math"]], three["dir"] / "lin"))
    assert lin[5].item() == pytest.approx(0.60, abs=1e-6)
    sl = _weights(merge_models("slerp", [three["code"], three["math"]], three["dir"] / "slerp", t=0.5))
    assert 0.4 < sl[5].item() < 0.8


def test_dare_drops_and_rescales(three):
    # density 0.5: about half of τ_code's entries are dropped (back to the base, 0.5); survivors are
    # rescaled up by one common factor (mergekit rescales to keep the task vector's L1 mass ≈ 1/density)
    out = merge_models("dare_linear", [three["code"]], three["dir"] / "dare", base=three["base"], density=0.5, seed=0)
    w = torch.round(_weights(out)[2:], decimals=4)
    values = sorted(w.unique().tolist())
    assert len(values) == 2 and values[0] == pytest.approx(0.5)
    assert values[1] > 0.8 + 0.1                              # rescaled beyond the plain 0.5 + 0.3
    assert 0.3 < (w == values[0]).float().mean().item() < 0.7


def test_config_errors_name_the_fix(three):
    with pytest.raises(ValueError, match="base model"):
        merge_config("ties", [three["code"], three["math"]], base=None)
    with pytest.raises(ValueError, match="one per model"):
        merge_config("linear", [three["code"], three["math"]], weights=[1.0])
