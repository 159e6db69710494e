"""Quantization: bitsandbytes NF4 (double quant) and LLM.int8 through transformers, PyTorch dynamic int8.

bitsandbytes 0.50 runs on CPU: NF4/int8 weights are quantized at load time (`quantization_config`)
and `save_pretrained` writes the packed weights plus the config, so the folder reloads quantized
with a plain `from_pretrained`. Compute dtype is fp32 (CPU; bf16 compute would change results).
PyTorch dynamic int8 (`torch.ao.quantization.quantize_dynamic`) quantizes Linear weights to int8 and
activations on the fly; its modules have no safetensors form, so the candidate folder holds a
recipe (parent + transformation) that `measure.load_candidate` replays.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import torch

RECIPE = "recipe.json"


def quiet_bnb_warnings() -> None:
    # bnb's CPU int8 matmul warns on every forward pass; the cast is expected and harmless here.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")


def bnb_config(kind: str, double_quant: bool = True, skip_modules: list[str] | None = None):
    """The BitsAndBytesConfig for `nf4` or `int8` on CPU."""
    from transformers import BitsAndBytesConfig

    # None keeps transformers' default skip list (lm_head); [] would try to quantize a tied lm_head,
    # which bitsandbytes 0.50 cannot run.
    skip = None if skip_modules is None else list(skip_modules)
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"unknown bitsandbytes quantization {kind!r}: use nf4 or int8")


def quantize_bnb(parent_dir: Path, out_dir: Path, kind: str, double_quant: bool = True,
                 skip_modules: list[str] | None = None):
    """Load the parent quantized (nf4 | int8), save the packed model + tokenizer. Returns the model."""
    from stagewise.modeling import load_model, load_tokenizer, save_model

    quiet_bnb_warnings()
    model = load_model(parent_dir, quantization_config=bnb_config(kind, double_quant, skip_modules))
    save_model(model, load_tokenizer(parent_dir), out_dir, info={"method": kind, "parent": str(parent_dir)})
    return model.eval()


def dynamic_int8(model):
    """Linear layers → int8 weights with dynamically quantized activations (CPU kernels, fbgemm/onednn)."""
    from torch.ao.quantization import default_dynamic_qconfig

    quiet_bnb_warnings()
    # Decoder Linears only: lm_head is tied to the embedding, and quantizing it would untie (duplicate) it.
    spec = {f"model.layers.{n}": default_dynamic_qconfig for n, m in model.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)}
    return torch.ao.quantization.quantize_dynamic(model.eval(), spec, dtype=torch.qint8)


def quantize_dynamic_int8(parent_dir: Path, out_dir: Path):
    """Write a recipe folder (no weights: they are rebuilt from the parent) and return the model."""
    from stagewise.modeling import load_model

    model = dynamic_int8(load_model(parent_dir))
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / RECIPE).write_text(json.dumps(
        {"kind": "dynamic_int8", "parent": str(Path(parent_dir).resolve()),
         "how": "stagewise.compression.quantize.dynamic_int8(load_model(parent)): decoder Linears to int8"},
        indent=1))
    for f in Path(parent_dir).iterdir():  # tokenizer and configs, so the folder describes itself
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            shutil.copy2(f, out_dir / f.name)
    return model
