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


# bitsandbytes' 4-bit CPU kernel for CPUs with AVX-512-BF16 (`Linear4bit.forward` in eval mode,
# `functional._convert_weight_packed_for_cpu`) repacks each weight in blocks of 32 output rows and
# reshapes the absmax per 64-input block: other shapes raise `RuntimeError: shape ... is invalid`.
# A model quantized here may run on such a CPU elsewhere, so those layers stay in full precision
# on every machine (one folder, one behaviour) and are listed in the candidate's record.
NF4_CPU_BLOCK_OUT = 32
NF4_BLOCKSIZE = 64


def nf4_refused_shapes(model) -> list[str]:
    """Names of the Linear layers whose shape bitsandbytes' packed 4-bit CPU kernel cannot take."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and (m.out_features % NF4_CPU_BLOCK_OUT or m.in_features % NF4_BLOCKSIZE)]


def nf4_skip_modules(parent_dir: Path, skip_modules: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """(skip list for BitsAndBytesConfig, the layers added to it because the kernel refuses them).

    The parent is built on the meta device (no weights read) to see every Linear's shape; transformers'
    own defaults (tied / output embeddings) stay skipped when the user named none."""
    import re

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(parent_dir))
    base = get_keys_to_not_convert(meta) if skip_modules is None else list(skip_modules)
    refused = [n for n in nf4_refused_shapes(meta)
               if not any(n == k or n.endswith("." + k) or n.startswith(k + ".") for k in base)]
    if not refused:
        return skip_modules, []
    # transformers matches skip entries as regexes from the start of the module name
    return base + [re.escape(n) for n in refused], refused


def quantize_bnb(parent_dir: Path, out_dir: Path, kind: str, double_quant: bool = True,
                 skip_modules: list[str] | None = None):
    """Load the parent quantized (nf4 | int8), save the packed model + tokenizer.

    Returns (model, the layers kept in full precision because the 4-bit CPU kernel refuses their shape)."""
    from stagewise.modeling import load_model, load_tokenizer, save_model

    quiet_bnb_warnings()
    kept: list[str] = []
    if kind == "nf4":
        skip_modules, kept = nf4_skip_modules(parent_dir, skip_modules)
    model = load_model(parent_dir, quantization_config=bnb_config(kind, double_quant, skip_modules))
    info = {"method": kind, "parent": str(parent_dir)} | ({"full_precision_layers": kept} if kept else {})
    save_model(model, load_tokenizer(parent_dir), out_dir, info=info)
    return model.eval(), kept


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
