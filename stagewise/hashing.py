"""Content hashes: the currency of caching and lineage (never bare paths)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_hash(path: Path, pattern: str = "**/*") -> str:
    """Hash of relative names + contents of every file below `path` (order-independent)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).glob(pattern)):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(file_hash(p).encode())
    return h.hexdigest()[:16]


def path_hash(path: Path) -> str | None:
    """Content hash of a file, or of every file below a folder (names + contents); None if missing."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)[:16]
    if path.is_dir():
        return dir_hash(path)
    return None


def input_hashes(cfg, root: Path) -> dict:
    """Content hashes of what the data steps read from outside the data layers: each `data.sources` entry
    and each declared eval set (relative paths resolve against the workspace root), plus the held-out
    shares the plan asks decontaminate for. Written into params.resolved.yaml (`inputs:`), which dvc.yaml's
    ingest and decontaminate stages list as params: an edited, added or removed file re-runs them."""
    from stagewise.evalsets import plan, resolve_path

    sources = {}
    for name, s in sorted(cfg.data.sources.items()):
        # a hub dataset has no local content to hash: its name (and split) is what we know
        sources[name] = (f"hub:{s.path}:{s.split}" if s.format == "hf_hub"
                         else path_hash(resolve_path(s.path, root)) or "missing")
    p = plan(cfg, root)
    sets = {n: path_hash(Path(s["path"])) or "missing" for n, s in sorted(p.sets.items()) if s["origin"] == "declared"}
    return {"sources": sources, "eval_sets": sets,
            "heldout": {"kinds": p.heldout_kinds(), "share": cfg.evaluate.holdout_share,
                        "max": cfg.evaluate.holdout_max}}


def git_commit(cwd: Path | None = None) -> str:
    """The code version for lineage: commit of the Stagewise source tree (+ '-dirty')."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            raise OSError
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd or here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from stagewise import __version__

        return f"v{__version__}"


def dvc_out_hash(root: Path, stage: str) -> str | None:
    """The md5 DVC recorded in dvc.lock for a stage's first output (the data hash in model lineage)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = stages.get(stage, {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def training_data_hash(hashes: dict) -> str | None:
    """The data hash of the training stages (lineage tag and cache key): DVC's md5 of data/05_curated,
    and `+` that of data/05_raft when the raft step ran — SFT trains on both, so a changed raft setting
    or raft output changes its key; each part is an md5 in dvc.lock."""
    curated, raft = hashes.get("decontaminate"), hashes.get("raft")
    return curated if raft is None or curated is None else f"{curated}+{raft}"


def hash_weights(h, model):
    """Feed a model's state dict (names and bytes, in name order) to hasher `h` and return it: the one
    content hash of in-memory weights (evaluation's cache key, Ray Train's rank-equality note). torch.ao
    quantized tensors contribute their integer payload and scales; packed params of dynamically
    quantized modules (no tensor view) their state."""
    import torch

    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor) and not t.is_quantized:
            h.update(t.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
        elif isinstance(t, torch.Tensor):
            h.update(t.int_repr().cpu().contiguous().numpy().tobytes() + repr(t.q_per_channel_scales()
                     if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else t.q_scale()).encode())
        else:
            state = t.__getstate__() if hasattr(t, "__getstate__") else t
            h.update(repr(state).encode())
    return h
