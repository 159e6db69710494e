"""base — the model the training stages start from: a random init sized by `model:`, or `model.base`
(an HF folder, or a GGUF file converted once to safetensors).

The random init is pretraining's parent, so "pretraining learned something" is measured against
the same weights the run started from. It is saved, not registered: it is not a candidate.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from stagewise.config import Config
from stagewise.config import hash_obj
from stagewise.hashing import dir_hash
from stagewise.stage import Lineage, RunContext, init_key


def init_model(cfg: Config, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Random-init decoder (seeded) with the trained tokenizer, as an HF folder with safetensors."""
    from stagewise.modeling import build_model, load_tokenizer, save_model

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(cfg.model, tok, seed=cfg.run.seed)
    return save_model(model, tok, out_dir)


def resolve_base(cfg: Config, out_dir: Path) -> tuple[Path, str | None]:
    """`model.base` as a local HF folder, and the GGUF's hash when it came from one.

    A local folder is used in place (copied with the chat template when it has none, stagewise/chat.py);
    a `.gguf` file (or `pkg://package/file.gguf`) is converted once
    into `out_dir` (safetensors); a hub id is fetched by transformers for users with network (the
    demo and tests never take that branch)."""
    import json

    from stagewise.modeling import gguf_to_folder, load_parent, resolve_base_spec, save_model, with_chat_template

    path = resolve_base_spec(cfg.model.base)
    if isinstance(path, Path) and path.is_dir():
        return with_chat_template(path, out_dir, cfg.model.chat_template, cfg.model.trust_remote_code), None
    if isinstance(path, Path) and path.suffix == ".gguf":
        folder = gguf_to_folder(path, out_dir, cfg.model.trust_remote_code, cfg.model.chat_template)
        return folder, json.loads((folder / "gguf_source.json").read_text())["sha"]
    if isinstance(path, Path):
        raise ValueError(f"model.base: {path}: neither a model folder nor a .gguf file; point it at an HF folder "
                         "(config.json + *.safetensors) or a GGUF file")
    model, tok = load_parent(cfg, Path(cfg.model.base))
    return save_model(model, tok, out_dir), None


@task(name="base")
def base_task(cfg: Config, ctx: RunContext, tokenizer_hash: str | None) -> Lineage:
    """The starting model of the lineage: random init, or the configured base model."""
    ws = ctx.ws
    if cfg.model.base:
        path, gguf_sha = resolve_base(cfg, ws.model_dir("base"))
        weights = dir_hash(path, "*.safetensors")
        key = {"base": cfg.model.base, "weights": weights} | ({"gguf": gguf_sha} if gguf_sha else {})
        return Lineage("base", str(path), hash_obj(key), version=None, weights_hash=weights)
    out_dir = ws.model_dir("init")
    key = init_key(cfg, tokenizer_hash)
    marker = out_dir / "cache_key"
    if not (marker.exists() and marker.read_text() == key):
        init_model(cfg, ws.tokenizer, out_dir)
        marker.write_text(key)
    return Lineage("init", str(out_dir), key, version=None, weights_hash=dir_hash(out_dir, "*.safetensors"))
