"""What a run cleans up after a killed one, and when Prefect's stage cache may answer (fast, no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from stagewise.config import load_config
from stagewise.run import clean_crash_leftovers, mark_dead_runs
import tasks
from stagewise.stage import Lineage, RunContext, prefect_cache_key, stage_key
from stagewise.workspace import Workspace


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_go_live_ones_and_checkpoints_stay(tmp_path):
    models = tmp_path / "models"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        for name in (f".sft.tmp-{dead}", f".sft.old-{dead}", "sft.tmp", f".pretrain.tmp-{live.pid}",
                     "sft", "sft.checkpoints", "pretrain"):
            (models / name).mkdir(parents=True)
            (models / name / "model.safetensors").write_bytes(b"x")
        removed = {p.name for p in clean_crash_leftovers(Workspace.at(tmp_path))}
    finally:
        live.kill()
        live.wait()
    assert removed == {f".sft.tmp-{dead}", f".sft.old-{dead}", "sft.tmp"}
    assert sorted(p.name for p in models.iterdir()) == [f".pretrain.tmp-{live.pid}", "pretrain", "sft",
                                                        "sft.checkpoints"]


@pytest.fixture
def tracking(tmp_path):
    from stagewise import registry

    registry.setup_tracking(tmp_path)
    import mlflow

    return mlflow.MlflowClient(), mlflow.get_experiment_by_name(registry.EXPERIMENT).experiment_id


def test_runs_left_running_in_this_workspace_are_marked_killed(tmp_path, tracking):
    client, exp = tracking
    ws = Workspace.at(tmp_path)
    dead = client.create_run(exp, tags={"pipeline_run": "r1", "reports_dir": str(ws.reports / "r1")})
    child = client.create_run(exp, tags={"mlflow.parentRunId": dead.info.run_id, "pipeline_run": "r1"})
    other = client.create_run(exp, tags={"pipeline_run": "r9", "reports_dir": "/elsewhere/reports/r9"})
    current = client.create_run(exp, tags={"pipeline_run": "r2", "reports_dir": str(ws.reports / "r2")})
    killed = mark_dead_runs(ws, keep=current.info.run_id)
    assert set(killed) == {dead.info.run_id, child.info.run_id}
    status = {r: client.get_run(r).info.status for r in (dead.info.run_id, child.info.run_id,
                                                           other.info.run_id, current.info.run_id)}
    assert list(status.values()) == ["KILLED", "KILLED", "RUNNING", "RUNNING"]


def test_prefect_cache_answers_only_while_the_registered_model_is_there(tmp_path, tracking):
    from stagewise.hashing import dir_hash

    client, _ = tracking
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", "smoke")
    ctx = RunContext(run_id="r", root=tmp_path, mlflow_run_id=None, registered_model="sw-test", code_version="c")
    parent = Lineage("pretrain", str(tmp_path / "models" / "pretrain"), "parent-key", version="1")
    params = {"ctx": ctx, "cfg": cfg, "parent": parent, "data_hash": "abc.dir", "cache_only": False}
    task_ctx = SimpleNamespace(task=SimpleNamespace(name="sft"))
    key = stage_key(tasks.step("sft"), cfg, parent, "abc.dir")
    key_fn = prefect_cache_key(tasks.step("sft"))

    out = ctx.ws.model_dir("sft")
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights-v1")
    assert key_fn(task_ctx, params) is None                     # nothing registered yet

    client.create_registered_model("sw-test")
    client.create_model_version("sw-test", source=str(out), tags={
        "stage": "sft", "cache_key": key, "weights_hash": dir_hash(out, "*.safetensors")})
    hit = key_fn(task_ctx, params)
    assert hit.startswith(f"stagewise-sft-{key}-v1-r")
    # the replayed row carries the rulebook's verdict: other gate settings or another chain re-decide it
    assert key_fn(task_ctx, dict(params, cfg=cfg.model_copy(update={"gate": cfg.gate.model_copy(
        update={"general_max_drop_points": 1.0})}))) not in (None, hit)
    other = Lineage("pretrain", "", "k", version="1", weights_hash="w")
    assert key_fn(task_ctx, dict(params, accepted=[other])) not in (None, hit)

    assert key_fn(task_ctx, dict(params, data_hash="other.dir")) is None   # other inputs
    ctx.force_stages = ["sft"]
    assert key_fn(task_ctx, params) is None                     # --force-stage sft
    ctx.force_stages = []
    (out / "model.safetensors").write_bytes(b"something else")             # folder no longer that version
    assert key_fn(task_ctx, params) is None
