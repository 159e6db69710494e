"""A planted forgetting stage, end to end (issue 21): SFT trained without replay wipes out general text;
the rulebook rejects that child at the stage, the next stage trains on its parent, and the run still
ends with a champion that passes every rule."""

from __future__ import annotations

import json

import pytest

from conftest import make_workspace
from test_e2e import run_cli
from test_realbase_e2e import _client

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("rulebook") / "ws")
    proc = run_cli(ws, "run", "--profile", "smoke", "--set", "sft.replay_ratio=0", "--set", "run.threads=1",
                   timeout=1800)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return ws, proc, json.loads((ws / "reports" / "latest" / "summary.json").read_text())


def test_the_forgetting_stage_is_rejected_and_the_next_stage_starts_from_its_parent(planted):
    ws, proc, s = planted
    rows = {r["name"]: r for r in s["stages"]}
    sft = rows["sft"]
    assert sft["kept_parent"] and "sw_general_text.word_perplexity rose" in sft["kept_parent"]
    assert not sft["rules"]["passed"]
    # the next stage trained on the pretrain model, not on the rejected SFT child
    assert rows["preference"]["parent_version"] == rows["pretrain"]["model_version"]
    assert "sft: kept its parent" in proc.stdout


def test_the_run_still_promotes_a_model_that_passes_every_rule(planted):
    ws, _, s = planted
    gate = s["gate"]
    assert gate["passed"] is True and s["champion"]["version"] == gate["candidate"]["version"]
    assert all(r["passed"] for r in gate["rules"] if r["enforced"])
    rejected = next(r["model_version"] for r in s["stages"] if r["name"] == "sft")
    assert s["champion"]["version"] != rejected
    assert [t["passed"] for t in gate["tried"]][-1] is True


def test_a_first_stage_that_forgets_over_a_base_model_is_rejected_too(planted, tmp_path):
    """Over `model.base` the first stage's parent is the base, which is no registered version: a child that
    fails the rulebook is still rejected and the next stage trains on the base (a real base is worth
    keeping). The planted run's pretrain model plays the user's base; SFT forgets as above."""
    ws, _, first = planted
    base = ws / "models" / "pretrain"
    user = make_workspace(tmp_path / "ws")
    proc = run_cli(user, "run", "--profile", "smoke", "--set", f"model.base={base}", "--set", "sft.replay_ratio=0",
                   "--set", "run.threads=1", "--stages", "sft,preference", timeout=1800)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    s = json.loads((user / "reports" / "latest" / "summary.json").read_text())
    rows = {r["name"]: r for r in s["stages"]}
    assert "pretrain" not in rows and rows["sft"]["parent_version"] is None
    assert rows["sft"]["kept_parent"] and "(model.base)" in rows["sft"]["kept_parent"]
    assert not rows["sft"]["rules"]["passed"] and "sft: kept its parent" in proc.stdout
    # preference started from the base's weights, not from the rejected SFT child
    assert rows["preference"]["parent_version"] is None
    versions = {v.version: v.tags for v in _client(user).search_model_versions("name='stagewise'")}
    assert "rejected" in versions[int(rows["sft"]["model_version"])]
