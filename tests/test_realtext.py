"""A second world, end to end: real English from the installed packages (tests/realtext_world.py),
wired in only through params.yaml — `data.sources`, declared `evaluate.sets`, `<stage>.target`,
`gate.general` — in a fresh workspace where no demo world was ever generated.

Asserts what a user who brings their own data and evaluations needs: the run goes end to end, each
stage is judged on the user's declared set (and improves it), nothing is scored on the demo world,
and appending one record to a source file re-runs ingest and everything after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace
from realtext_world import TARGETS, build, user_params
from test_e2e import run_cli

# two smoke runs (the second from ingest to sft): 7.5 min for the module at run.threads=1 on a shared
# 2-core box (2026-12-01), so slow but not heavy
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

# as tests/stage_fixtures.py: on a shared 2-core box a second OpenMP thread costs more than it gives these
# tiny models (not a user setting: the run's params.yaml is the user's)
ONE_THREAD = ("--set", "run.threads=1")


@pytest.fixture(scope="module")
def realtext_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("realtext")
    world = build(root / "world")
    ws = make_workspace(root / "ws")
    user_params(ws / "params.yaml", world)
    proc = run_cli(ws, "run", "--profile", "smoke", *ONE_THREAD, timeout=1800)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    return ws, world, proc, json.loads((ws / "reports" / "latest" / "summary.json").read_text())


def test_each_stage_improves_its_declared_target(realtext_run):
    _, _, proc, s = realtext_run
    rows = {r["name"]: r for r in s["stages"]}
    assert set(rows) == set(TARGETS)
    table = []
    for stage, name in TARGETS.items():
        r = rows[stage]
        assert r["target_metric"].split(".")[0] in (name, f"{name}_sampled"), r["target_metric"]
        table.append(f"{stage:<10} {r['target_metric']:<30} {r['baseline_value']:.4g} -> {r['value']:.4g}")
    print("\n".join(table))
    # SFT and DPO learn this world's declared targets; a later stage's input depends on the rulebook (a
    # child that forgets is rejected and the next stage trains on its parent, issue 21): it improves its
    # target, or its row names the rule that rejected it
    assert rows["sft"]["improved"] is True and rows["preference"]["improved"] is True, rows
    for stage in TARGETS:
        r = rows[stage]
        assert r["improved"] is True or (r.get("kept_parent") and r["rules"]["failed"]), (stage, r)
    assert "my_qa" in proc.stdout and "eval sets:" in proc.stdout


def test_a_first_run_on_own_data_promotes_a_model_that_passes_every_rule(realtext_run):
    """Issue 21: every decision applies the gate's rulebook, and the gate falls back down its candidates,
    so a user's first run ends with a champion (never 'nothing promoted' because one stage forgot)."""
    ws, _, _, s = realtext_run
    gate = s["gate"]
    assert gate["passed"] is True and s["champion"]["version"] == gate["candidate"]["version"]
    assert all(r["passed"] for r in gate["rules"] if r["enforced"])
    tried = gate["tried"]
    assert tried[-1]["passed"] and not any(t["passed"] for t in tried[:-1])
    assert [t["candidate"]["version"] for t in tried][-1] == s["champion"]["version"]
    for r in s["stages"]:   # every stage's verdict is the rulebook's, said in its row
        assert r["rules"]["passed"] == (not r.get("kept_parent")), r
    if len(tried) > 1:
        assert "Candidates tried (fallback order)" in (ws / "reports" / s["run_id"] / "gate.md").read_text()


def test_nothing_is_scored_on_the_demo_world(realtext_run):
    ws, world, _, s = realtext_run
    assert not (ws / "data" / "01_raw" / "benchmarks").exists()
    assert set(s["eval_sets"]) == {f"my_{k}" for k in world["sets"]}
    assert all(v["origin"] == "declared" and v["data_hash"] and v["items"] for v in s["eval_sets"].values())
    general = {r["metric"] for r in s["gate"]["rules"] if r["rule"] != "target_improves"}
    assert general == {"my_text.word_perplexity"}
    # the compiled tasks are in the run's reports, with absolute data paths, for lm_eval re-runs
    compiled = ws / "reports" / s["run_id"] / "evals" / "my_qa.yaml"
    assert world["sets"]["qa"] in compiled.read_text()
    # every declared set was a decontamination reference
    refs = json.loads((ws / "data" / "05_curated" / "stats.json").read_text())["references"]
    assert sorted(refs) == sorted(world["sets"].values())
    assert "Evaluation sets behind these numbers" in (ws / "reports" / s["run_id"] / "gate.md").read_text()


def test_auto_settings_are_resolved_from_this_world(realtext_run):
    """The training settings left at `auto` became numbers measured on this world's curated data, and
    those numbers are what the run recorded (params.resolved.yaml, the report's config.yaml)."""
    ws, _, proc, s = realtext_run
    facts, resolved = s["recipe"]["facts"], {r["setting"]: r["value"] for r in s["recipe"]["resolved"]}
    curated = ws / "data" / "05_curated"
    assert facts["chats"] == sum(1 for _ in (curated / "chat.jsonl").open())
    assert facts["problems"] == sum(1 for _ in (curated / "verifiable.jsonl").open())
    assert facts["width"] == 64 and facts["corpus_tokens"] > 0
    assert {"pretrain.max_steps", "sft.epochs", "preference.epochs", "reasoning.max_steps"} <= set(resolved)
    for where in (ws / "params.resolved.yaml", ws / "reports" / s["run_id"] / "config.yaml"):
        cfg = yaml.safe_load(where.read_text())
        assert cfg["pretrain"]["max_steps"] == resolved["pretrain.max_steps"], where
        assert cfg["sft"]["epochs"] == resolved["sft.epochs"], where
    assert "recipe: pretrain.max_steps: auto → " in proc.stdout + proc.stderr
    rows = {r["name"]: r for r in s["stages"]}
    assert rows["pretrain"]["steps"] <= resolved["pretrain.max_steps"]


def test_appending_a_record_to_a_source_reruns_ingest_and_what_follows(realtext_run):
    ws, world, _, first = realtext_run
    chat = Path(world["sources"]["chat"])
    with chat.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "What does textwrap.dedent do?"},
                                         {"role": "assistant", "content": "Remove any common leading whitespace."}]})
                + "\n")
    proc = run_cli(ws, "run", "--profile", "smoke", *ONE_THREAD, "--stages",
                   "ingest,quality,dedup,decontaminate,validate,tokenizer,pretrain,sft", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    assert {"ingest", "quality", "dedup", "decontaminate"} <= set(s["data"]["ran"])
    assert s["data"]["inputs"]["sources"]["chat"] != first["data"]["inputs"]["sources"]["chat"]
    ingested = (ws / "data" / "02_ingested" / "chat.jsonl").read_text()
    assert "textwrap.dedent" in ingested
    rows = {r["name"]: r for r in s["stages"]}
    assert rows["sft"]["cached"] is False          # new curated data: a new model
