"""Scale-out of the data steps: the data phase on a Dask cluster (prefect-dask) gives byte-identical
DVC outputs to the sequential run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import make_workspace


def run_data_phase(ws: Path, overrides: list[str], monkeypatch) -> dict:
    """The flow's data phase, on the task runner `ops.data_runner` selects (no MLflow, no training)."""
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
    ctx = RunContext(run_id="dask-test", root=ws, mlflow_run_id=None, registered_model="stagewise",
                     code_version="test")
    return data_phase.with_options(task_runner=data_task_runner(cfg.ops))(cfg, ctx, cfg.run.stages)


def tree(ws: Path) -> dict[str, str]:
    """Every file under data/ → content hash, with the workspace's own path masked (stats name inputs).

    GX's rendered Data Docs are left out: their folder names and pages carry the validation time.
    """
    import hashlib

    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes().replace(str(ws).encode(), b"<ws>")).hexdigest()
            for p in sorted((ws / "data").rglob("*")) if p.is_file() and "data_docs" not in p.parts}


@pytest.mark.e2e
def test_data_steps_on_dask_match_the_sequential_run(tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    seq = run_data_phase(make_workspace(tmp_path / "seq"), [], monkeypatch)
    # A "real" cluster the pipeline only knows by address (ops.dask_address), as in production.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dask = run_data_phase(make_workspace(tmp_path / "dask"),
                              ["ops.data_runner=dask", f"ops.dask_address={cluster.scheduler_address}"],
                              monkeypatch)
        ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    steps = ["generate", "ingest", "quality", "dedup", "decontaminate", "raft", "validate", "tokenizer"]
    assert {f"{s}_task" for s in steps} <= set(ran), ran           # every data step ran on the cluster
    assert dask["cached"] == [] and seq["cached"] == []
    a, b = tree(tmp_path / "seq"), tree(tmp_path / "dask")
    assert a.keys() == b.keys() and len(a) > 20
    assert [f for f in a if a[f] != b[f]] == []
    assert dask["stats"]["dedup"]["removed"] == seq["stats"]["dedup"]["removed"]
