"""The flow's data phase with `ops.engine: ray` (quality and dedup sharded over a local Ray the steps
start themselves) gives byte-identical DVC outputs to the local run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import make_workspace


def run_data_phase(ws: Path, overrides: list[str], monkeypatch) -> dict:
    """The flow's data phase (no MLflow, no training)."""
    from flows.pipeline import data_phase
    from stagewise import dvcops, registry
    from stagewise.config import load_config
    from stagewise.run import data_task_runner
    from stagewise.stage import RunContext

    monkeypatch.chdir(ws)   # like `stagewise run` and deployments: DVC resolves params files from the cwd
    cfg = load_config(ws / "params.yaml", "smoke", overrides)
    from stagewise.hashing import input_hashes

    # as start_run writes it: dvc.yaml's ingest and decontaminate read the `inputs.*` hashes
    (ws / "params.resolved.yaml").write_text(
        yaml.safe_dump({**cfg.to_dict(), "inputs": input_hashes(cfg, ws)}, sort_keys=False))
    dvcops.ensure_repo(ws)
    registry.setup_tracking(ws)   # data steps log nested MLflow runs
    ctx = RunContext(run_id="ray-test", root=ws, mlflow_run_id=None, registered_model="stagewise",
                     code_version="test")
    return data_phase.with_options(task_runner=data_task_runner())(cfg, ctx, cfg.run.stages)


def tree(ws: Path) -> dict[str, str]:
    """Every file under data/ → content hash, with the workspace's own path masked (stats name inputs).

    GX's rendered Data Docs are left out: their folder names and pages carry the validation time.
    """
    import hashlib

    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes().replace(str(ws).encode(), b"<ws>")).hexdigest()
            for p in sorted((ws / "data").rglob("*")) if p.is_file() and "data_docs" not in p.parts}


@pytest.mark.e2e
@pytest.mark.slow   # two data phases and a local Ray: minutes on 2 busy cores
def test_the_data_phase_on_ray_matches_the_local_run(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")
    import ray

    local = run_data_phase(make_workspace(tmp_path / "local"), [], monkeypatch)
    sharded = run_data_phase(make_workspace(tmp_path / "ray"),
                             ["ops.engine=ray", "ops.ray_num_cpus=1", "ops.data_tasks=3"], monkeypatch)
    assert not ray.is_initialized()   # each sharded step started its own Ray and stopped it
    placed = tmp_path / "ray" / ".stagewise" / "shards" / "placement"
    assert sorted(p.name for p in placed.iterdir()) == [
        "dedup-buckets.json", "dedup-cluster_task.json", "dedup-signatures.json", "quality-judge.json"]
    assert sharded["cached"] == [] and local["cached"] == []
    a, b = tree(tmp_path / "local"), tree(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) > 20
    assert [f for f in a if a[f] != b[f]] == []
    # the DVC hashes of every data step but validate, whose Data Docs carry the validation time
    same = {k: v for k, v in sharded["hashes"].items() if k != "validate"}
    assert same == {k: v for k, v in local["hashes"].items() if k != "validate"} and len(same) == 7   # raft too
