"""Model merging with mergekit (its Python API): linear soup, SLERP, task arithmetic, TIES, DARE.

Checkpoints that share a base (here: the stages after pretraining all descend from models/pretrain)
are merged without training. With task vectors tau_i = theta_i - theta_base:
  task_arithmetic  theta_base + sum_i w_i tau_i
  ties             trim each tau_i to its top-`density` magnitudes, elect a sign per weight (sign of the
                   summed trimmed vectors), average only the entries agreeing with it (Yadav et al. 2023)
  dare_*           drop tau entries at random with p = 1 - density, rescale survivors by 1/density
  linear           weighted average of the weights (model soup); slerp: spherical interpolation of two.
mergekit 0.1.5 installs cleanly beside transformers 5 / torch 2.13 and ran all five on tiny Llama
checkpoints here, so we use it instead of re-implementing these (tests/test_compress_merge.py checks
the arithmetic through it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TASK_VECTOR_METHODS = {"task_arithmetic", "ties", "dare_ties", "dare_linear"}


def merge_config(method: str, models: list[Path], base: Path | None = None, weights: list[float] | None = None,
                 density: float = 0.5, t: float = 0.5) -> dict:
    """The mergekit YAML (as a dict) for `method` over `models` (absolute local folders)."""
    models = [str(Path(m).resolve()) for m in models]
    weights = weights or [1.0] * len(models)
    if len(weights) != len(models):
        raise ValueError(f"compress.merge.weights has {len(weights)} entries for {len(models)} models; give one per model")
    cfg: dict = {"merge_method": method, "dtype": "float32"}
    if method == "slerp":
        if len(models) != 2:
            raise ValueError(f"slerp merges exactly two models (got {len(models)})")
        cfg |= {"base_model": models[0], "models": [{"model": m} for m in models], "parameters": {"t": t}}
    elif method == "linear":
        cfg |= {"models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]}
    elif method in TASK_VECTOR_METHODS:
        if base is None:
            raise ValueError(f"{method} needs a base model (compress.merge.base_stage): task vectors are theta - theta_base")
        params = lambda w: {"weight": w} | ({"density": density} if method != "task_arithmetic" else {})  # noqa: E731
        cfg |= {"base_model": str(Path(base).resolve()),
                "models": [{"model": m, "parameters": params(w)} for m, w in zip(models, weights)]}
    else:
        raise ValueError(f"unknown merge method {method!r}: use linear, slerp, task_arithmetic, ties, dare_ties or dare_linear")
    return cfg


def merge_models(method: str, models: list[Path], out_dir: Path, base: Path | None = None,
                 weights: list[float] | None = None, density: float = 0.5, t: float = 0.5, seed: int = 0) -> Path:
    """Run mergekit and write a complete HF folder (weights + config + the first model's tokenizer)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    for m in list(models) + ([base] if base else []):
        if not (Path(m) / "config.json").exists():
            raise FileNotFoundError(f"{m}: not a model folder (no config.json); check compress.merge settings")
    mc = MergeConfiguration.model_validate(merge_config(method, models, base, weights, density, t))
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    torch.manual_seed(seed)  # DARE's random drop
    run_merge(mc, out_path=str(out_dir), options=MergeOptions(
        cuda=False, copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False, trust_remote_code=False,
        allow_crimes=False, quiet=True))
    src = Path(models[0])
    for f in src.iterdir():  # tokenizer + chat template + generation config of the parent
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                                          "chat_template.jinja",
                                                                          "generation_config.json")):
            shutil.copy2(f, out_dir / f.name)
    return out_dir
