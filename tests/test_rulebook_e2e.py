"""A planted forgetting stage, end to end (issue 21): SFT trained without replay wipes out general text;
the rulebook rejects that child at the stage, the next stage trains on its parent, and the run still
ends with a champion that passes every rule."""

from __future__ import annotations

import json

import pytest

from conftest import make_workspace
from test_e2e import run_cli

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
