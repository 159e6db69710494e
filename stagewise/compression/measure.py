"""Measure a candidate: parameters, bytes on disk, memory footprint, generation tokens/s on CPU.

Also the one loader every compression candidate goes through (`load_candidate`): an HF folder
(bitsandbytes folders carry their `quantization_config` in config.json and reload quantized), or a
folder with a `recipe.json` for what cannot be saved as safetensors (PyTorch dynamic int8): the
recipe names the parent folder and the transformation, and is replayed at load time.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import torch

from stagewise.compression.quantize import RECIPE, dynamic_int8, quiet_bnb_warnings

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def load_candidate(model_dir: Path):
    """Load any candidate folder written by the compress step as an eval-mode fp32-compute model."""
    from stagewise.modeling import load_model

    quiet_bnb_warnings()
    model_dir = Path(model_dir)
    recipe_path = model_dir / RECIPE
    if recipe_path.exists():
        recipe = json.loads(recipe_path.read_text())
        if recipe.get("kind") != "dynamic_int8":
            raise ValueError(f"{recipe_path}: unknown recipe kind {recipe.get('kind')!r}; expected 'dynamic_int8'")
        model = dynamic_int8(load_model(recipe["parent"]))
    else:
        model = load_model(model_dir)
    return model.eval()


def param_count(model) -> int:
    """Parameters of the architecture (a 4-bit weight counts once, not as its packed bytes)."""
    n = 0
    for p in model.parameters():
        q = getattr(p, "quant_state", None)
        n += int(torch.Size(q.shape).numel()) if q is not None else p.numel()
    # dynamic-int8 Linear layers keep their weights in packed params, not in .parameters()
    for m in model.modules():
        if type(m).__name__ == "Linear" and type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"):
            w, b = m._weight_bias()
            n += w.numel() + (b.numel() if b is not None else 0)
    return n


def disk_bytes(model_dir: Path) -> int:
    """Bytes of the weight files in a folder (tokenizer and configs excluded)."""
    return sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def state_bytes(model) -> int:
    """Bytes of the serialized state dict: the footprint of models HF cannot account for (dynamic int8)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def memory_bytes(model) -> int:
    """Weights and buffers resident in memory (HF's accounting; bnb 4-bit weights count as packed bytes)."""
    if any(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in model.modules()):
        return state_bytes(model)
    return int(model.get_memory_footprint())


@torch.no_grad()
def tokens_per_s(models: dict[str, object], n_tokens: int = 32, repeats: int = 3, prompt_len: int = 8,
                 batch_size: int = 1, threads: int = 1) -> dict[str, float]:
    """Greedy generation speed (new tokens/s) of several models, timed interleaved: one warm-up
    generation each, then every round times each model once and the best round counts, so load from
    other processes hits all models alike. Runs on each model's own device (CPU here; a model placed
    on a GPU is timed there, synchronised).

    One thread by default: batch-1 decoding of small models does not scale with threads, and on a
    shared machine a second spinning OpenMP thread makes timings swing by 10x.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        jobs = {}
        for name, model in models.items():
            device = getattr(model, "device", torch.device("cpu"))
            ids = torch.randint(8, model.config.vocab_size, (batch_size, prompt_len), generator=g).to(device)
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                      do_sample=False, pad_token_id=pad)
            model.generate(ids, **kw)  # warm-up
            jobs[name] = (model, ids, kw)
        best = {name: float("inf") for name in jobs}
        for _ in range(max(1, repeats)):
            for name, (model, ids, kw) in jobs.items():
                _sync(ids.device)
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                _sync(ids.device)
                best[name] = min(best[name], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {name: round(n_tokens * batch_size / t, 2) for name, t in best.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, model_dir: Path | None) -> dict:
    """Size numbers of one loaded model (bytes: weight files in model_dir, if any)."""
    quiet_bnb_warnings()
    mem = memory_bytes(model)
    on_disk = disk_bytes(model_dir) if model_dir is not None else 0
    if model_dir is not None and (Path(model_dir) / RECIPE).exists():
        on_disk = mem  # nothing but the recipe is on disk: report what shipping the weights would cost
    return {"params": param_count(model), "bytes": on_disk, "memory_bytes": mem}


def sparsity(model) -> float:
    """Share of exactly-zero weights in the decoder's Linear layers (what pruning touches)."""
    zeros = total = 0
    for m in model.model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)
