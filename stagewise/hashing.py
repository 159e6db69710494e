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
