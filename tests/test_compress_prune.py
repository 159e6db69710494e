"""Pruning: sparsity really reached (and kept through recovery), 2:4 pattern, structured = smaller model."""

from __future__ import annotations

import pytest
import torch

from compress_fixtures import compress_env  # noqa: F401  (session fixture)
from stagewise.compression import distill, prune
from stagewise.compression.measure import param_count, sparsity


@pytest.fixture(scope="module")
def setup(compress_env):  # noqa: F811
    from stagewise.compression.data import curated_texts, lm_blocks
    from stagewise.modeling import load_tokenizer

    ws, parent_dir, cfg = compress_env
    tok = load_tokenizer(parent_dir)
    texts = curated_texts(ws, tok)
    return parent_dir, tok, lm_blocks(tok, texts, 64, max_blocks=48), texts[-12:]


def _load(parent_dir):
    from stagewise.modeling import load_model

    return load_model(parent_dir).eval()


def test_magnitude_prune_zeroes_the_smallest_weights_and_survives_recovery(setup, tmp_path):
    from stagewise.modeling import load_model, save_model

    parent_dir, tok, blocks, _ = setup
    parent = _load(parent_dir)
    assert sparsity(parent) < 0.01
    m = prune.magnitude_prune(_load(parent_dir), 0.5)
    w0 = m.model.layers[0].mlp.up_proj.weight.detach().clone()
    kept = w0 != 0
    # the zeroed half holds the smallest magnitudes of that layer
    assert w0[kept].abs().min() >= parent.model.layers[0].mlp.up_proj.weight[~kept].abs().max() - 1e-7
    m, info = distill.recover(m, blocks, steps=3, lr=1e-2, batch_size=8, seed=0, bf16=False, work_dir=tmp_path / "w")
    m = prune.make_permanent(m)
    w1 = m.model.layers[0].mlp.up_proj.weight
    assert not hasattr(m.model.layers[0].mlp.up_proj, "weight_orig")      # masks folded in
    assert torch.equal(w1 == 0, ~kept)                                   # training moved weights, not zeros
    assert not torch.allclose(w1[kept], w0[kept])
    assert sparsity(m) == pytest.approx(0.5, abs=0.01)
    save_model(m, tok, tmp_path / "pm")
    assert sparsity(load_model(tmp_path / "pm")) == pytest.approx(0.5, abs=0.01)  # zeros are in the file


def test_two_four_pattern(setup):
    parent_dir, *_ = setup
    m = prune.make_permanent(prune.two_four_prune(_load(parent_dir)))
    for _, lin in prune.decoder_linears(m):
        nz = (lin.weight != 0).view(lin.weight.shape[0], -1, 4).sum(-1)
        assert (nz <= 2).all()
    assert sparsity(m) == pytest.approx(0.5, abs=0.01)


def test_two_four_mask_keeps_the_two_largest():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 0.0, -2.0, 1.0]])
    assert prune.two_four_mask(w).tolist() == [[0, 1, 1, 0, 1, 0, 1, 0]]


def test_shrink_without_removal_is_the_same_model(setup):
    parent_dir, _, blocks, _ = setup
    p = _load(parent_dir)
    with torch.no_grad():
        assert torch.allclose(prune.shrink_llama(p)(blocks[:2]).logits, p(blocks[:2]).logits, atol=1e-5)


def test_structured_prune_is_a_smaller_dense_model_that_generates(setup, tmp_path):
    from stagewise.modeling import load_model, mean_nll, save_model

    parent_dir, tok, blocks, held = setup
    p = _load(parent_dir)
    small = prune.structured_prune(_load(parent_dir), blocks[:8], mlp_fraction=0.5, kv_group_fraction=0.5)
    assert small.config.intermediate_size == p.config.intermediate_size // 2
    assert small.config.num_key_value_heads == 1 and small.config.num_attention_heads == 2
    assert param_count(small) <= 0.7 * param_count(p)                   # ≥ 30% of the parameters gone
    save_model(small, tok, tmp_path / "ps")
    reloaded = load_model(tmp_path / "ps")
    assert param_count(reloaded) == param_count(small)
    out = reloaded.generate(torch.tensor([[tok.bos_token_id, 5, 6]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == 9
    # the activation ranking keeps what matters: better than keeping a random half
    g = torch.Generator().manual_seed(0)
    rand = prune.shrink_llama(p, neurons=[torch.randperm(192, generator=g)[:96].sort().values for _ in range(2)],
                              kv_groups=[torch.tensor([1]), torch.tensor([0])])
    assert mean_nll(small, tok, held) < mean_nll(rand, tok, held)


def test_structured_prune_drops_the_least_influential_layer(setup):
    parent_dir, _, blocks, _ = setup
    p = _load(parent_dir)
    influence = prune.calibrate(p, blocks[:8])["influence"]
    small = prune.structured_prune(_load(parent_dir), blocks[:8], 0.0, 0.0, layer_fraction=0.5)
    assert small.config.num_hidden_layers == 1
    kept = int(influence.argmax())
    # the surviving layer is the parent's most influential one, weights unchanged
    assert torch.equal(small.model.layers[0].mlp.up_proj.weight, p.model.layers[kept].mlp.up_proj.weight)


def test_bad_fraction_names_the_key(setup):
    parent_dir, _, blocks, _ = setup
    with pytest.raises(ValueError, match="compress.prune.mlp_fraction"):
        prune.structured_prune(_load(parent_dir), blocks[:2], 1.2, 0.0)


def test_task_examples_are_what_the_parent_was_trained_on(compress_env):
    """Round-robin over corpus, chat and verifiable; chat-shaped examples learn only the assistant's reply."""
    import json

    from stagewise.compression.data import task_examples
    from stagewise.modeling import load_tokenizer

    ws, parent_dir, _ = compress_env
    tok = load_tokenizer(parent_dir)
    ex = task_examples(ws, tok, n=9, seq_len=64, seed=0)
    assert len(ex) == 9
    corpus, chat, ver = ex[0::3], ex[1::3], ex[2::3]
    for e in corpus:  # packed text: every token learned
        assert len(e["input_ids"]) == 64 and torch.equal(e["labels"], e["input_ids"])
    answers = {str(json.loads(line)["answer"]) for line in (ws.curated / "verifiable.jsonl").read_text().splitlines()}
    for e in chat + ver:
        learned = e["labels"] != -100
        assert learned.any() and not learned.all()
        assert torch.equal(e["labels"][learned], e["input_ids"][learned])
        prompt = tok.decode(e["input_ids"][~learned])
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")   # the question is context only
        assert tok.decode(e["labels"][learned]).endswith("<|end|>")                 # the reply and its stop token
    for e in ver:
        reply = tok.decode(e["labels"][e["labels"] != -100]).removesuffix("<|end|>")
        assert reply.startswith("The answer is ") and reply.removeprefix("The answer is ").rstrip(".") in answers


def test_recovery_distils_the_pruned_model_towards_its_parent(setup, compress_env, tmp_path):
    """KD recovery (λ=1: the KL term alone) on task examples: the pruned model's KL to the parent on
    held-out examples falls."""
    from stagewise.compression.data import pad_collator, task_examples
    from stagewise.compression.distill import distill_loss

    parent_dir, tok, blocks, _ = setup
    ws = compress_env[0]
    parent = _load(parent_dir)
    ex = task_examples(ws, tok, n=60, seq_len=64, seed=1)
    train, held = ex[:48], pad_collator(tok.pad_token_id)(ex[48:])

    def kl(m):
        with torch.no_grad():
            fwd = {k: v for k, v in held.items() if k != "labels"}
            return distill_loss(m(**fwd).logits, parent(**fwd).logits, held["labels"], 2.0, alpha=1.0)["kl"].item()

    small = prune.structured_prune(_load(parent_dir), blocks[:8], mlp_fraction=0.75, kv_group_fraction=0.5)
    before = kl(small)
    small, info = distill.recover(small, train, steps=6, lr=1e-3, batch_size=8, seed=0, bf16=False,
                                work_dir=tmp_path / "w", teacher=parent, temperature=2.0, alpha=1.0,
                                pad_id=tok.pad_token_id)
    assert info["recovery_alpha"] == 1.0 and info["recovery_steps"] == 6
    assert kl(small) < before
