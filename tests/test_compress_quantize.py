"""Quantization: NF4 / int8 (bitsandbytes on CPU) and PyTorch dynamic int8 really shrink and reload."""

from __future__ import annotations

import pytest
import torch

from compress_fixtures import compress_env  # noqa: F401  (session fixture)
from stagewise.compression.measure import disk_bytes, load_candidate, measure
from stagewise.compression.quantize import RECIPE
from stagewise.compression.quantize import quantize_bnb, quantize_dynamic_int8


@pytest.fixture(scope="module")
def parent(compress_env):  # noqa: F811
    from stagewise.modeling import load_model

    ws, parent_dir, cfg = compress_env
    return parent_dir, load_model(parent_dir).eval()


def _linear_bytes(model) -> int:
    """Bytes held by the decoder's linear weights (packed 4-bit data + quantization constants for NF4)."""
    total = 0
    for m in model.model.layers.modules():
        w = getattr(m, "weight", None)
        if w is None or m.__class__.__name__ in ("LlamaRMSNorm",):
            continue
        total += w.numel() * w.element_size()
        q = getattr(w, "quant_state", None)
        if q is not None:
            total += sum(t.numel() * t.element_size() for t in (q.absmax, getattr(q, "state2", None) and q.state2.absmax,
                                                                  getattr(q, "offset", None)) if isinstance(t, torch.Tensor))
    return total


def test_nf4_is_smaller_reloads_and_stays_close(parent, tmp_path):
    parent_dir, p = parent
    q, _ = quantize_bnb(parent_dir, tmp_path / "nf4", "nf4")
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # weight storage of the quantized layers: fp32 → NF4 with double-quantized constants is ~7.5x
    assert _linear_bytes(p) / _linear_bytes(q) >= 3.5
    assert measure(p, parent_dir)["memory_bytes"] / measure(q, tmp_path / "nf4")["memory_bytes"] > 2.0
    assert disk_bytes(tmp_path / "nf4") < disk_bytes(parent_dir) / 2
    reloaded = load_candidate(tmp_path / "nf4")
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    x = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, q(x).logits, atol=1e-5)   # the saved folder is the model
        lp, lq = p(x).logits.log_softmax(-1), q(x).logits.log_softmax(-1)
    assert (lp.exp() - lq.exp()).abs().sum(-1).max() < 0.5                  # close to the parent, not identical
    assert not torch.equal(lp, lq)


def test_int8_is_smaller_and_reloads(parent, tmp_path):
    parent_dir, p = parent
    q, _ = quantize_bnb(parent_dir, tmp_path / "int8", "int8")
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert measure(q, tmp_path / "int8")["memory_bytes"] < measure(p, parent_dir)["memory_bytes"]
    reloaded = load_candidate(tmp_path / "int8")
    x = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, q(x).logits, atol=1e-4)


def test_dynamic_int8_recipe_rebuilds_from_parent(parent, tmp_path):
    parent_dir, p = parent
    q = quantize_dynamic_int8(parent_dir, tmp_path / "dyn")
    assert (tmp_path / "dyn" / RECIPE).exists() and disk_bytes(tmp_path / "dyn") == 0
    reloaded = load_candidate(tmp_path / "dyn")
    assert "quantized" in type(reloaded.model.layers[0].mlp.up_proj).__module__
    m = measure(reloaded, tmp_path / "dyn")
    assert m["params"] == measure(p, parent_dir)["params"]
    assert m["memory_bytes"] < measure(p, parent_dir)["memory_bytes"]
    x = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, q(x).logits)
        assert (reloaded(x).logits - p(x).logits).abs().max() < 0.5


@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16-kernel", "plain-cpu-kernel"])
def test_nf4_of_a_pruned_shape_runs_on_either_cpu_kernel(compress_env, tmp_path, avx512bf16):  # noqa: F811
    """A structurally pruned MLP (96 neurons) gives down_proj 96 inputs: bitsandbytes' AVX-512-BF16 CPU
    kernel packs 4-bit weights in 64-input blocks and crashed on it in eval mode. Such layers stay fp32
    (on every CPU: the folder may be run on another), are listed, and the model runs on both paths."""
    from compress_fixtures import cpu_4bit_kernel, make_model
    from stagewise.modeling import load_tokenizer, save_model

    ws, parent_dir, _ = compress_env
    tok = load_tokenizer(parent_dir)
    pruned = make_model(tok, intermediate_size=96).eval()
    save_model(pruned, tok, tmp_path / "pruned")
    with cpu_4bit_kernel(avx512bf16):
        q, kept = quantize_bnb(tmp_path / "pruned", tmp_path / "nf4", "nf4")
        assert kept == [f"model.layers.{i}.mlp.down_proj" for i in range(pruned.config.num_hidden_layers)]
        layer = q.model.layers[0].mlp
        assert type(layer.down_proj) is torch.nn.Linear and type(layer.up_proj).__name__ == "Linear4bit"
        assert layer.up_proj.support_avx512bf16_for_cpu is avx512bf16
        x = torch.tensor([[1, 5, 9, 13, 17]])
        with torch.no_grad():
            lq = q(x).logits
            reloaded = load_candidate(tmp_path / "nf4")
            assert torch.allclose(reloaded(x).logits, lq, atol=1e-4)
            lp = pruned(x).logits
    assert torch.isfinite(lq).all() and (lp.softmax(-1) - lq.softmax(-1)).abs().sum(-1).max() < 0.5
    import json
    assert json.loads((tmp_path / "nf4" / "stage_info.json").read_text())["full_precision_layers"] == kept
