"""What a stage's cache key depends on, and how far a --force-stage reaches (fast, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagewise.config import load_config
from stagewise.stage import Lineage, RunContext, stage_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "params.yaml", "smoke")


def ctx(**kw) -> RunContext:
    return RunContext(run_id="r", root=Path("."), mlflow_run_id=None, registered_model="m", code_version="c", **kw)


def test_force_stage_cascades_to_every_stage_built_on_its_weights():
    forced = ctx(force_stages=["sft"])
    assert {s: forced.forced(s) for s in ("pretrain", "sft", "preference", "reasoning", "compress")} == {
        "pretrain": False, "sft": True, "preference": True, "reasoning": True, "compress": True}
    # Data steps are cached by content (DVC): forcing one re-runs it, and its consumers only if its outputs change.
    data = ctx(force_stages=["dedup"])
    assert data.forced("dedup") and not data.forced("decontaminate") and not data.forced("pretrain")
    assert all(ctx(force=True).forced(s) for s in ("generate", "pretrain", "reasoning", "compress", "gate"))
    assert not any(ctx().forced(s) for s in ("generate", "pretrain", "compress"))


def test_a_retrained_parent_is_a_new_parent_even_under_the_same_key(cfg):
    old = Lineage("sft", "models/sft", "sft-key", version="2", weights_hash="aaaa")
    new = Lineage("sft", "models/sft", "sft-key", version="5", weights_hash="bbbb")
    same = Lineage("sft", "models/sft", "sft-key", version="5", weights_hash="aaaa")
    k_old, k_new = stage_key("preference", cfg, old, "d.dir"), stage_key("preference", cfg, new, "d.dir")
    assert k_old != k_new
    # Identical weights (a deterministic re-train) are the same input: the version number is not content.
    assert stage_key("preference", cfg, same, "d.dir") == k_old
    assert stage_key("preference", cfg, old, "other.dir") != k_old


def test_reasoning_key_covers_the_replay_helpers_it_trains_with(cfg, monkeypatch):
    """An edit to stagewise/compression/data.py (the replay term's batching) re-keys reasoning, not sft."""
    from stagewise import hashing

    parent = Lineage("preference", "models/preference", "p-key", version="3", weights_hash="aaaa")
    before = {s: stage_key(s, cfg, parent, "d.dir") for s in ("sft", "reasoning")}
    real = hashing.source_hash
    monkeypatch.setattr(hashing, "source_hash", lambda *mods: real(*mods) + (
        "-edited" if "stagewise.compression.data" in mods else ""))
    after = {s: stage_key(s, cfg, parent, "d.dir") for s in ("sft", "reasoning")}
    assert after["reasoning"] != before["reasoning"] and after["sft"] == before["sft"]
