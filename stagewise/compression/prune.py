"""Pruning: unstructured magnitude, 2:4 semi-structured, and structured (a genuinely smaller dense model).

Unstructured and 2:4 use `torch.nn.utils.prune`: a mask is attached (`weight = weight_orig * mask`),
the optional recovery fine-tune trains `weight_orig` through the mask so pruned weights stay zero,
and `prune.remove` makes it permanent. The saved model has the same shape with real zeros: smaller
only once compressed (or on sparse kernels; PyTorch's 2:4 kernels are CUDA-only, so on CPU 2:4 buys
no speed — measured and reported, not assumed).

Structured pruning ranks units with activations on curated calibration text and slices them out:
MLP neurons (importance = mean |input of down_proj| x column norm of down_proj, Wanda-style) and
GQA key/value groups with their query heads (importance = output norm of their heads through
o_proj). The result is a smaller LlamaConfig (intermediate_size, num_attention_heads,
num_key_value_heads; head_dim kept) and a dense model that is faster at every size. `shrink_llama`
also drops layers and residual channels: the distillation student is initialised with it.
"""

from __future__ import annotations


import torch
from torch.nn.utils import prune as tprune


# ---------------------------------------------------------------- unstructured / 2:4
def decoder_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """Linear layers inside the decoder blocks (the tied embedding / lm_head is never pruned)."""
    return [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]


def magnitude_prune(model, sparsity: float):
    """Attach L1-magnitude masks zeroing `sparsity` of every decoder Linear's weights."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"compress.prune.sparsity={sparsity}: must be in [0, 1)")
    for _, m in decoder_linears(model):
        tprune.l1_unstructured(m, name="weight", amount=sparsity)
    return model


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """2:4 mask: in every group of 4 consecutive input weights of a row, keep the 2 largest |w|."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4 (got {in_f})")
    groups = weight.detach().abs().reshape(out_f, in_f // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(out_f, in_f)


def two_four_prune(model):
    """Attach 2:4 semi-structured masks to every decoder Linear."""
    for _, m in decoder_linears(model):
        tprune.custom_from_mask(m, name="weight", mask=two_four_mask(m.weight))
    return model


def make_permanent(model):
    """Fold masks into the weights (`prune.remove`): plain Linear layers with real zeros."""
    for _, m in decoder_linears(model):
        if tprune.is_pruned(m):
            tprune.remove(m, "weight")
    return model


# ---------------------------------------------------------------- structured
@torch.no_grad()
def calibrate(model, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Activation statistics on calibration blocks: per-layer MLP neuron and attention head scores,
    per-channel residual magnitude, and each layer's block influence (1 - cos(in, out), ShortGPT)."""
    cfg = model.config
    n_layers, hd = cfg.num_hidden_layers, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mlp = [torch.zeros(cfg.intermediate_size) for _ in range(n_layers)]
    heads = [torch.zeros(cfg.num_attention_heads) for _ in range(n_layers)]
    channels = torch.zeros(cfg.hidden_size)
    influence = torch.zeros(n_layers)
    hooks = []

    def mlp_hook(i):
        def f(mod, args):
            mlp[i] += args[0].abs().float().mean(dim=(0, 1))
        return f

    def head_hook(i):
        def f(mod, args):
            x = args[0].float()
            heads[i] += x.view(*x.shape[:-1], -1, hd).norm(dim=-1).mean(dim=(0, 1))
        return f

    def norm_hook(mod, args, out):
        channels.add_(out.abs().float().mean(dim=(0, 1)))

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        hooks.append(layer.input_layernorm.register_forward_hook(norm_hook))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(norm_hook))
    model.eval()
    try:
        for s in range(0, len(blocks), batch_size):
            out = model(input_ids=blocks[s:s + batch_size], output_hidden_states=True)
            hs = out.hidden_states
            for i in range(n_layers):
                cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
                influence[i] += (1 - cos).mean()
    finally:
        for h in hooks:
            h.remove()
    # scale activations by the weights they pass through: a loud unit with tiny outgoing weights matters little
    for i, layer in enumerate(model.model.layers):
        mlp[i] *= layer.mlp.down_proj.weight.float().norm(dim=0)
        wo = layer.self_attn.o_proj.weight.float()
        heads[i] *= wo.view(wo.shape[0], -1, hd).norm(dim=(0, 2))
    return {"mlp": mlp, "heads": heads, "channels": channels, "influence": influence}


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (keeps the layout stable)."""
    return scores.topk(k).indices.sort().values


def shrink_llama(model, *, layers: list[int] | None = None, hidden: torch.Tensor | None = None,
                 neurons: list[torch.Tensor] | None = None, kv_groups: list[torch.Tensor] | None = None):
    """A new, smaller LlamaForCausalLM holding the kept slices of `model`.

    layers: kept layer indices; hidden: kept residual channels; neurons[j] / kv_groups[j]: kept MLP
    neurons / key-value groups of the j-th kept layer (same count in every layer: one config).
    """
    from transformers import LlamaForCausalLM

    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"structured pruning supports Llama models (got model_type={cfg.model_type!r})")
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    layers = list(range(cfg.num_hidden_layers)) if layers is None else list(layers)
    H = torch.arange(cfg.hidden_size) if hidden is None else hidden
    neurons = neurons or [torch.arange(cfg.intermediate_size)] * len(layers)
    kv_groups = kv_groups or [torch.arange(cfg.num_key_value_heads)] * len(layers)
    n_inter, n_kv = len(neurons[0]), len(kv_groups[0])
    if any(len(x) != n_inter for x in neurons) or any(len(x) != n_kv for x in kv_groups):
        raise ValueError("every layer must keep the same number of neurons and key/value groups")

    new_cfg = cfg.__class__.from_dict({
        **cfg.to_dict(), "num_hidden_layers": len(layers), "hidden_size": len(H), "intermediate_size": n_inter,
        "num_key_value_heads": n_kv, "num_attention_heads": n_kv * group, "head_dim": hd,
    })
    small = LlamaForCausalLM(new_cfg)
    small.generation_config = model.generation_config

    def rows(kv: torch.Tensor, per: int) -> torch.Tensor:  # weight rows of the kept heads
        return torch.cat([torch.arange(g * per * hd, (g + 1) * per * hd) for g in kv.tolist()])

    src = model.state_dict()
    dst = {}
    dst["model.embed_tokens.weight"] = src["model.embed_tokens.weight"][:, H]
    dst["model.norm.weight"] = src["model.norm.weight"][H]
    if not new_cfg.tie_word_embeddings:
        dst["lm_head.weight"] = src["lm_head.weight"][:, H]
    for j, i in enumerate(layers):
        p, q = f"model.layers.{i}.", f"model.layers.{j}."
        qr, kr = rows(kv_groups[j], group), rows(kv_groups[j], 1)
        dst[q + "self_attn.q_proj.weight"] = src[p + "self_attn.q_proj.weight"][qr][:, H]
        dst[q + "self_attn.k_proj.weight"] = src[p + "self_attn.k_proj.weight"][kr][:, H]
        dst[q + "self_attn.v_proj.weight"] = src[p + "self_attn.v_proj.weight"][kr][:, H]
        dst[q + "self_attn.o_proj.weight"] = src[p + "self_attn.o_proj.weight"][H][:, qr]
        for b in ("q", "k", "v"):
            if p + f"self_attn.{b}_proj.bias" in src:
                dst[q + f"self_attn.{b}_proj.bias"] = src[p + f"self_attn.{b}_proj.bias"][qr if b == "q" else kr]
        if p + "self_attn.o_proj.bias" in src:
            dst[q + "self_attn.o_proj.bias"] = src[p + "self_attn.o_proj.bias"][H]
        N = neurons[j]
        dst[q + "mlp.gate_proj.weight"] = src[p + "mlp.gate_proj.weight"][N][:, H]
        dst[q + "mlp.up_proj.weight"] = src[p + "mlp.up_proj.weight"][N][:, H]
        dst[q + "mlp.down_proj.weight"] = src[p + "mlp.down_proj.weight"][H][:, N]
        dst[q + "input_layernorm.weight"] = src[p + "input_layernorm.weight"][H]
        dst[q + "post_attention_layernorm.weight"] = src[p + "post_attention_layernorm.weight"][H]
    missing, unexpected = small.load_state_dict(dst, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied: comes from the embedding
    if missing or unexpected:
        raise RuntimeError(f"shrink_llama: state dict mismatch (missing {missing}, unexpected {unexpected})")
    if new_cfg.tie_word_embeddings:
        small.tie_weights()
    return small.eval()


def structured_prune(model, blocks: torch.Tensor, mlp_fraction: float, kv_group_fraction: float,
                     layer_fraction: float = 0.0):
    """Remove the least important layers (block influence), then MLP neurons and key/value groups in
    every kept layer. Returns the smaller model.

    Width pruning shrinks the matmuls; at small sizes decoding time is mostly per-layer overhead, so
    only dropping layers makes batch-1 generation markedly faster (bench/compress.py shows both).
    """
    for name, f in (("mlp_fraction", mlp_fraction), ("kv_group_fraction", kv_group_fraction),
                    ("layer_fraction", layer_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"compress.prune.{name}={f}: must be in [0, 1)")
    cfg = model.config
    stats = calibrate(model, blocks)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    n_layers = max(1, round(cfg.num_hidden_layers * (1 - layer_fraction)))
    n_inter = max(1, round(cfg.intermediate_size * (1 - mlp_fraction)))
    n_kv = max(1, round(cfg.num_key_value_heads * (1 - kv_group_fraction)))
    layers = top_k(stats["influence"], n_layers).tolist()
    neurons = [top_k(stats["mlp"][i], n_inter) for i in layers]
    kv = [top_k(stats["heads"][i].view(-1, group).sum(-1), n_kv) for i in layers]
    return shrink_llama(model, layers=layers, neurons=neurons, kv_groups=kv)
