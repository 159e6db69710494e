"""Sharded curation on Ray (`ops.engine: ray`): quality and dedup split into `ops.data_tasks` Ray tasks
(datatrove's RayPipelineExecutor) write byte-identical outputs to the one-process run, for any N."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import make_workspace

ray = pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Path, object]:
    """The smoke world, generated and ingested (the input of quality), and its config."""
    from stagewise.config import load_config
    from tasks.generate import generate
    from tasks.ingest import ingest

    ws = make_workspace(tmp_path_factory.mktemp("ray") / "ws")
    cfg = load_config(ws / "params.yaml", "smoke", [])
    generate(cfg.generate, ws / "data" / "01_raw")
    ingest(cfg.data, cfg.ingest, ws / "data" / "01_raw", ws / "data" / "02_ingested", root=ws)
    return ws, cfg


@pytest.fixture
def local_ray():
    # two CPUs at most: the machine is shared; no dashboard
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ops_for(cfg, ws: Path, tasks: int):
    return cfg.ops.model_copy(update={"engine": "ray", "data_tasks": tasks, "ray_scratch": str(ws / "scratch")})


@pytest.mark.slow   # eight executor runs on a local Ray: ~1-2 min on 2 busy cores
def test_quality_and_dedup_on_ray_match_the_local_run_for_1_and_3_tasks(ingested, local_ray, tmp_path):
    from tasks.dedup import dedup
    from tasks.quality import quality

    ws, cfg = ingested
    src = ws / "data" / "02_ingested"
    quality(cfg.quality, src, tmp_path / "local" / "q")
    dedup(cfg.dedup, tmp_path / "local" / "q", tmp_path / "local" / "d")
    want_q, want_d = files(tmp_path / "local" / "q"), files(tmp_path / "local" / "d")
    stats_q = json.loads((tmp_path / "local" / "q" / "stats.json").read_text())
    stats_d = json.loads((tmp_path / "local" / "d" / "stats.json").read_text())
    # the smoke world plants junk and duplicates: the comparison covers removals of every family
    assert stats_q["removed"] and {"exact_dup", "near_dup"} <= set(stats_d["removed"])
    for n in (1, 3):
        out = tmp_path / f"ray{n}"
        quality(cfg.quality, src, out / "q", ops_for(cfg, ws, n))
        dedup(cfg.dedup, out / "q", out / "d", ops_for(cfg, ws, n))
        assert files(out / "q") == want_q, n
        assert files(out / "d") == want_d, n
        placed = json.loads((ws / "scratch" / "placement" / "dedup-signatures.json").read_text())
        assert sorted(p["task"] for p in placed) == list(range(n))   # one Ray task per shard
        assert all(p["node_id"] == ray.get_runtime_context().get_node_id() for p in placed)
    # the run folders are gone; only the placement records stay
    assert sorted(p.name for p in (ws / "scratch").iterdir()) == ["placement"]


@pytest.mark.slow
def test_a_sharded_step_starts_and_stops_its_own_ray_when_none_runs(ingested, tmp_path):
    """ops.ray_address null: the step starts a local Ray of ops.ray_num_cpus CPUs and shuts it down."""
    from tasks.quality import quality

    assert not ray.is_initialized()
    ws, cfg = ingested
    ops = ops_for(cfg, ws, 2).model_copy(update={"ray_num_cpus": 1})
    stats = quality(cfg.quality, ws / "data" / "02_ingested", tmp_path / "q", ops)
    assert sum(stats["kept"].values()) > 0
    assert not ray.is_initialized()
