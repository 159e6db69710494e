"""DVC remote round trip: a step's outputs pushed to a (local-directory) remote come back byte-identical
on a machine that has only the workspace's dvc.lock — the way a cluster node or a colleague gets data."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import make_workspace

BIN = Path(sys.executable).parent


def dvc(ws: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_push_then_pull_into_an_empty_cache_restores_the_data(tmp_path, monkeypatch):
    from stagewise import dvcops
    from stagewise.config import load_config
    import tasks
    from stagewise.steps import metrics_path
    from stagewise.workspace import Workspace

    ws = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    cfg = load_config(ws / "params.yaml", "smoke")
    (ws / "params.resolved.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dvcops.ensure_repo(ws)
    stats = tasks.prefect_task("generate").fn(**tasks.step("generate").args(cfg, Workspace.at(ws)))
    md5 = dvcops.commit(ws, "generate", stats, metrics_path(Workspace.at(ws), "generate"))
    raw = ws / "data" / "01_raw"
    before = tree(raw)
    assert md5 and len(before) >= 5

    remote = tmp_path / "remote"          # S3 is the same with s3://bucket/path (docs/scale-out.md)
    dvc(ws, "remote", "add", "--default", "store", str(remote))
    assert "store" in (ws / ".dvc" / "config").read_text()
    dvc(ws, "push", "generate")
    assert any(p.is_file() for p in remote.rglob("*"))

    # A fresh machine: the lock file and params, no data, no cache.
    shutil.rmtree(raw)
    shutil.rmtree(ws / ".dvc" / "cache")
    assert "not in cache" in dvc(ws, "status", "generate")
    dvc(ws, "pull", "generate")
    assert tree(raw) == before
    assert "up to date" in dvc(ws, "status", "generate")
    assert dvcops.is_current(ws, "generate")
