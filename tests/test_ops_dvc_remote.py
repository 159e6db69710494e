"""DVC remote round trip: a step's outputs pushed to a (local-directory) remote come back byte-identical
on a machine that has only the workspace's dvc.lock — the way a cluster node or a colleague gets data."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_workspace

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


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.email=ci@stagewise", "-c", "user.name=ci", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"git {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def data_run(ws: Path) -> dict:
    """The data phase of the smoke profile, the way a user starts it; returns its summary."""
    import json

    data_steps = ",".join(s.name for s in __import__("tasks").of_kind("data"))
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(BIN / "stagewise"), "run", "--profile", "smoke", "--stages", data_steps], cwd=ws,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads((ws / "reports" / "latest" / "summary.json").read_text())


@pytest.mark.slow
def test_the_readme_round_trip_run_commit_push_clone_pull_is_clean_and_the_next_run_reuses_it(tmp_path):
    """README "Data versioning with a team remote", as written: run, commit what it says, push to a
    folder remote; a fresh clone pulls, `dvc status` is clean, and its next run re-runs no data step."""
    ws = make_workspace(tmp_path / "ws")
    for f in (".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "data/.gitignore"):   # as in a clone
        (ws / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, ws / f)
    git(ws, "init", "-q")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "workspace")
    first = data_run(ws)
    assert first["data"]["ran"], first["data"]

    dvc(ws, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    git(ws, "add", "dvc.lock", "params.resolved.yaml", "metrics/", ".dvc/config")
    git(ws, "commit", "-qm", "data of the run")
    assert not git(ws, "status", "--porcelain"), "the README's list left something out"
    dvc(ws, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ws), str(clone))
    dvc(clone, "pull")
    assert "Data and pipelines are up to date" in dvc(clone, "status")
    for layer in ("01_raw", "05_curated", "07_tokenizer"):
        assert tree(clone / "data" / layer) == tree(ws / "data" / layer), layer
    again = data_run(clone)
    assert again["data"]["ran"] == [] and set(again["data"]["cached"]) == set(first["data"]["ran"]), again["data"]
    assert "Data and pipelines are up to date" in dvc(clone, "status")
