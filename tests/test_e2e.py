"""End to end: `stagewise run --profile smoke` in a fresh workspace with its own stores.

One pipeline run (module-scoped) and several tests reading what it left behind: the MLflow store,
the registry, DVC, reports/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_workspace

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def run_cli(ws: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), PATH=f"{BIN}:{os.environ['PATH']}")
    # mlflow.set_tracking_uri() in this process exports MLFLOW_TRACKING_URI: the run must use its own store.
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(BIN / "stagewise"), *args, "--config", str(ws / "params.yaml")],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("e2e") / "ws")
    proc = run_cli(ws, "run", "--profile", "smoke")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    return ws, proc, summary


def test_summary_has_every_field_and_prints_the_table(smoke_run):
    ws, proc, s = smoke_run
    assert {"run_id", "profile", "stages", "gate", "champion"} <= s.keys()
    assert s["profile"] == "smoke"
    assert (ws / "reports" / s["run_id"] / "summary.json").exists()
    names = [r["name"] for r in s["stages"]]
    assert names[:2] == ["pretrain", "sft"]
    for r in s["stages"]:
        assert {"name", "model_version", "target_metric", "value", "baseline_value", "improved", "cached", "seconds"} <= r.keys()
        assert r["cached"] is False
    assert "gate:" in proc.stdout and "pretrain" in proc.stdout


def test_pretrain_and_sft_measurably_learn(smoke_run):
    _, _, s = smoke_run
    rows = {r["name"]: r for r in s["stages"]}
    assert rows["pretrain"]["value"] < rows["pretrain"]["baseline_value"]   # held-out perplexity fell
    assert rows["pretrain"]["improved"] is True
    assert rows["sft"]["improved"] is True


def test_mlflow_has_pipeline_run_nested_stage_runs_and_versions_with_lineage(smoke_run):
    ws, _, s = smoke_run
    import mlflow

    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("stagewise")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == s["mlflow_run_id"]]
    assert parent and parent[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == s["mlflow_run_id"]}
    assert {"pretrain", "sft"} <= children
    sft_run = next(r for r in runs if r.info.run_name == "sft")
    assert "sw_instruct.exact_match" in sft_run.data.metrics and sft_run.data.params["sft.peft"] == "none"
    versions = client.search_model_versions("name='stagewise'")
    assert len(versions) >= 2
    by_stage = {v.tags["stage"]: v for v in versions}
    sft = by_stage["sft"]
    assert sft.tags["parent_version"] == str(by_stage["pretrain"].version)
    assert sft.tags["base_model"] == "none"                 # the smoke profile starts from random init
    # DVC's md5 of data/05_curated, + that of data/05_raft (the open-book chats SFT also trains on)
    parts = sft.tags["data_hash"].split("+")
    assert len(parts) == 2 and all(p.endswith(".dir") for p in parts)
    lock = (ws / "dvc.lock").read_text()
    assert all(p in lock for p in parts)
    assert len(sft.tags["config_hash"]) == 16 and sft.tags["code_version"]
    # artifacts live in the workspace store, never in a stray ./mlruns
    assert not (ws / "mlruns").exists() and (ws / "mlflow" / "artifacts").is_dir()


def test_dvc_reports_the_data_pipeline_up_to_date(smoke_run):
    ws, _, _ = smoke_run
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    out = subprocess.run([str(BIN / "dvc"), "status"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout, out.stdout
    metrics = json.loads((ws / "metrics" / "dedup.json").read_text())
    assert metrics["removed"]                                 # dvc metrics carry the curation counts


def test_models_are_safetensors(smoke_run):
    ws, _, _ = smoke_run
    for stage in ("pretrain", "sft"):
        d = ws / "models" / stage
        assert (d / "model.safetensors").exists() and not list(d.glob("*.bin"))


def test_champion_follows_the_gate_verdict_and_challenger_is_the_candidate(smoke_run):
    ws, _, s = smoke_run
    import mlflow

    from stagewise import registry

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    # the last stage that was kept (a stage worse on its own target is rejected: train.keep_parent_on_regression)
    final = next(r["model_version"] for r in reversed(s["stages"]) if not r.get("kept_parent"))
    trained = final
    shipped = (s.get("compression") or {}).get("shipped")
    # the gate judges what ships: the compressed model the compress step chose, else the trained one
    final = shipped["version"] if shipped else trained
    assert s["gate"]["candidate"]["version"] == final
    if shipped:
        tags = registry.version_tags("stagewise", final)
        assert tags["stage"] == "compress" and tags["parent_version"] == trained
        assert s["gate"]["compared_with"]["uncompressed"] == trained
    assert registry.alias_version("stagewise", registry.CHALLENGER) == final
    champion = registry.alias_version("stagewise", registry.CHAMPION)
    if s["gate"]["passed"]:
        assert champion == final == s["champion"]["version"]
    else:  # a failing gate never moves champion (first run: there is none)
        assert champion is None and s["champion"]["version"] is None
        assert registry.version_tags("stagewise", final)["gate"] == "failed"
    assert (ws / "reports" / s["run_id"] / "gate.html").stat().st_size > 1000


def test_planted_forgetting_is_blocked_names_the_metric_and_champion_stays(smoke_run):
    """docs/evaluation.md's planted-forgetting run: SFT without replay (`sft.replay_ratio=0`) wipes out
    general text. The rulebook rejects that child at the stage itself (registered, tagged `rejected`, the
    chain keeps the pretrain model); the gate's only candidate left, the pretrain model, may not replace
    a chat champion (it loses the champion's SFT target), so `run --strict` exits 1 and champion stays."""
    ws, _, s = smoke_run
    import mlflow

    from stagewise import registry

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    # A champion to protect, whatever the smoke gate said: the smoke run's SFT model, put in by hand.
    sft_version = next(st["model_version"] for st in s["stages"] if st["name"] == "sft")
    proc = run_cli(ws, "promote", "--version", sft_version, "--force", "--reason", "e2e: a champion to protect")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert registry.alias_version("stagewise", registry.CHAMPION) == sft_version

    up_to_sft = "generate,ingest,quality,dedup,decontaminate,raft,validate,tokenizer,pretrain,sft,gate"
    proc = run_cli(ws, "run", "--profile", "smoke", "--stages", up_to_sft, "--set", "sft.replay_ratio=0", "--strict")
    assert proc.returncode == 1, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    planted = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    new_sft = planted["stages"][-1]
    assert new_sft["name"] == "sft" and new_sft["model_version"] != sft_version and not new_sft["cached"]
    # rejected at the stage, by the gate's own general rule, and registered as such
    assert "sw_general_text.word_perplexity rose" in new_sft["kept_parent"] and not new_sft["rules"]["passed"]
    assert "rejected" in registry.version_tags("stagewise", new_sft["model_version"])
    gate = planted["gate"]
    assert gate["passed"] is False and gate["candidate"]["stage"] == "pretrain"
    failed = {(r["metric"], r["against"]) for r in gate["rules"] if not r["passed"]}
    assert ("sw_instruct.token_f1", f"champion v{sft_version}") in failed
    assert registry.alias_version("stagewise", registry.CHAMPION) == sft_version      # did not move
    assert "NOT PROMOTED" in (ws / "reports" / planted["run_id"] / "gate.md").read_text().splitlines()[2]


def test_the_reports_lm_eval_tasks_read_the_fields_the_data_has(smoke_run):
    """reports/<run>/evals/ is what docs/evaluation.md's `lm_eval --include_path` reads: compiled again at
    the end of the run, from the data a fresh run's `generate` wrote after the first compile."""
    ws, _, s = smoke_run
    evals = ws / "reports" / s["run_id"] / "evals"
    assert "{{question}}" in (evals / "sw_arithmetic.yaml").read_text()
    assert "{{question}}" in (evals / "sw_instruct.yaml").read_text()
