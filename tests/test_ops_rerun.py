"""The unchanged re-run (stagewise/rerun.py): answered before Prefect or torch are imported, and only
when nothing a run depends on moved. The slow tests work on copies of the shared finished smoke run."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import workspace_env

BIN = Path(sys.executable).parent
HEAVY = ("prefect", "torch", "transformers", "lm_eval", "flows")


def test_the_cli_and_the_up_to_date_check_import_no_engine():
    # what `stagewise run` imports before it knows whether the flow must run at all
    code = ("import sys, stagewise.cli, stagewise.rerun, stagewise.summary, stagewise.stage, stagewise.registry\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_run_that_trained_ran_a_data_step_or_moved_the_champion_is_not_recorded():
    from stagewise.rerun import fully_cached

    cached = {"data": {"ran": [], "cached": ["ingest"]}, "stages": [{"name": "sft", "cached": True}],
              "compression": {"cached": True}, "gate": {"passed": True, "champion_moved": False}}
    assert fully_cached(cached)
    assert not fully_cached({**cached, "stages": [{"name": "sft", "cached": False}]})
    assert not fully_cached({**cached, "data": {"ran": ["quality"]}})
    assert not fully_cached({**cached, "compression": {"cached": False}})
    assert not fully_cached({**cached, "gate": {"passed": True, "champion_moved": True}})
    assert not fully_cached({**cached, "stages": []})


def test_without_a_record_or_with_a_force_the_pipeline_runs(tmp_path):
    import tasks
    from stagewise.config import load_config
    from stagewise.rerun import decide

    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    cfg = load_config(tmp_path / "params.yaml", "smoke")
    assert decide(tmp_path, cfg, tasks.STEPS) == (None, "no fully cached run recorded since the workspace last changed")
    assert decide(tmp_path, cfg, tasks.STEPS, force_stages=["sft"])[1] == "--force-stage sft"
    assert decide(tmp_path, cfg, tasks.STEPS, stages=["gate"])[1] == "--stages given"


def stagewise(ws: Path, *args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *python_flags, "-c", "from stagewise.cli import main; main()", *args],
                          cwd=ws, env=workspace_env(ws), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def settled(finished_smoke_workspace, tmp_path_factory) -> Path:
    """A copy of the finished smoke run, run once more: that run reuses everything and is recorded."""
    ws = tmp_path_factory.mktemp("rerun") / "ws"
    subprocess.run(["cp", "-a", str(finished_smoke_workspace), str(ws)], check=True)
    proc = stagewise(ws, "run", "--profile", "smoke")
    assert "running the pipeline: no fully cached run recorded" in proc.stderr   # the cold run trained: no record
    assert (ws / ".stagewise" / "rerun.json").is_file()
    return ws


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_an_unchanged_rerun_answers_without_prefect_torch_or_a_new_run(settled):
    last = json.loads((settled / "reports" / "latest" / "summary.json").read_text())
    reports = sorted(p.name for p in (settled / "reports").iterdir())
    proc = stagewise(settled, "run", "--profile", "smoke", python_flags=("-X", "importtime"))
    assert f"up to date: nothing changed since run {last['run_id']}" in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {*HEAVY, "mlflow"}, sorted(imported & {*HEAVY, "mlflow"})   # the workspace's own store
    assert "sft " in proc.stdout and f"report: reports/{last['run_id']}/" in proc.stdout
    assert "data steps: ran none" in proc.stdout
    assert sorted(p.name for p in (settled / "reports").iterdir()) == reports   # no new run was recorded


@contextlib.contextmanager
def _restored(*paths: Path):
    """Change the workspace in place, then put these files back byte for byte (the record stays valid:
    the control below is answered from it again)."""
    saved = {p: p.read_bytes() for p in paths}
    try:
        yield
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


@contextlib.contextmanager
def _sft_folder_deleted(ws: Path):
    folder, away = ws / "models" / "sft", ws / "sft-away"
    folder.rename(away)
    try:
        yield
    finally:
        away.rename(folder)


@contextlib.contextmanager
def _curated_data_edited(ws: Path):
    f = ws / "data" / "05_curated" / "chat.jsonl"
    with _restored(f):
        f.write_text(f.read_text() + json.dumps({"id": "late", "messages": []}) + "\n")
        yield


@contextlib.contextmanager
def _params_edited(ws: Path):
    params = ws / "params.yaml"
    with _restored(params):
        params.write_text(params.read_text().replace("  smoke:\n", "  smoke:\n    gate: {general_max_drop_points: 3.5}\n", 1))
        yield


@contextlib.contextmanager
def _registered_version_deleted(ws: Path):
    import mlflow

    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    version = next(r["model_version"] for r in summary["stages"] if r["name"] == "preference")
    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"      # a client, not set_tracking_uri: that exports the env var
    with _restored(ws / "mlflow" / "mlflow.db"):
        mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).delete_model_version(summary["registered_model"], version)
        yield


@contextlib.contextmanager
def _champion_moved(ws: Path):
    import mlflow

    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    with _restored(ws / "mlflow" / "mlflow.db"):
        mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
            summary["registered_model"], "champion", summary["stages"][0]["model_version"])
        yield


@contextlib.contextmanager
def _unchanged(ws: Path):
    yield


def _decide(ws: Path, overrides=(), **kwargs):
    import tasks
    from stagewise.config import load_config
    from stagewise.rerun import decide

    return decide(ws, load_config(ws / "params.yaml", "smoke", list(overrides)), tasks.STEPS, **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("change, kwargs, why", [
    (_unchanged, {}, None),                                             # the control: answered from the record
    (_params_edited, {}, "settings changed since run"),
    (_unchanged, {"overrides": ["sft.epochs=3"]}, "settings changed since run"),
    (_sft_folder_deleted, {}, "models/sft is missing"),
    (_unchanged, {"force_stages": ["sft"]}, "--force-stage sft"),
    (_unchanged, {"force": True}, "--force"),
    (_curated_data_edited, {}, "dvc status: decontaminate"),
    (_registered_version_deleted, {}, "the MLflow store changed"),
    (_champion_moved, {}, "the MLflow store changed"),
])
def test_anything_a_run_depends_on_that_moved_runs_the_pipeline(settled, change, kwargs, why):
    latest = json.loads((settled / "reports" / "latest" / "summary.json").read_text())["run_id"]
    with change(settled):
        summary, reason = _decide(settled, **kwargs)
    if why is None:
        assert summary is not None and summary["run_id"] == latest, reason
    else:
        assert summary is None and why in reason, reason
        assert _decide(settled)[0] is not None, "the change was put back: the record answers again"
