"""The model that ships: the compress step registers its choice, the gate judges that compressed model,
and `champion` moves to it (or, planted, refuses it); promote / rollback work on compressed versions."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from compress_fixtures import compress_env, cpu_4bit_kernel  # noqa: F401  (session fixture)
from conftest import ROOT
from stagewise import registry
from stagewise.stage import Lineage, RunContext


@pytest.fixture(scope="module", autouse=True)
def _avx512bf16_cpu_kernel():
    """Every NF4 layer of this module takes bitsandbytes' AVX-512-BF16 CPU path, whatever this CPU has
    (the pruned+nf4 chain crashed there: issue 22)."""
    with cpu_4bit_kernel(True):
        yield


@pytest.fixture(scope="module")
def shipped(compress_env, tmp_path_factory):  # noqa: F811
    """A registered uncompressed 'sft' model, the compress step run on it for real, and its result."""
    import mlflow

    from tasks.compress import run_compress
    from stagewise.evaluation import evaluate
    from stagewise.stage import eval_tasks_dir

    ws0, parent_dir, base_cfg = compress_env
    root = tmp_path_factory.mktemp("ship")
    shutil.copytree(ws0.root / "data", root / "data")
    shutil.copytree(ROOT / "evals", root / "evals")
    registry.setup_tracking(root)
    ctx = RunContext(run_id="test-ship", root=root, mlflow_run_id=None, registered_model="ship",
                     code_version="test")
    cfg = base_cfg.model_copy(deep=True)
    cfg.evaluate.limit, cfg.evaluate.bootstrap_iters = 10, 100
    cfg.compress.methods = ["prune_structured", "prune_structured+nf4"]
    # accuracy limits wide open: this test is about the wiring (the limits have tests of their own)
    cfg.compress.select.max_task_drop_points, cfg.compress.select.max_task_rise_pct = 100.0, 1000.0
    cfg.gate.general_max_drop_points, cfg.gate.perplexity_max_rise_pct = 100.0, 1000.0
    cfg.compress.select.min_speed_ratio = 0.0
    cfg.gate.require_target_improvement = False

    with mlflow.start_run(run_name="sft") as run:
        v_sft = registry.log_model_version(parent_dir, "ship", "sft", {"parent_version": "none"}, run.info.run_id)
    evals = ["sw_instruct", "sw_general_text", "sw_general_mc"]
    scores = evaluate(parent_dir, evals, ctx.ws, cfg.evaluate, tasks_dir=eval_tasks_dir(cfg, root))
    trained = Lineage("sft", str(parent_dir), "k-sft", v_sft, None, scores, weights_hash="w")
    trained.parent_metrics = copy.deepcopy(trained.metrics)
    lineage = [Lineage("init", str(parent_dir), "k-init"), trained]
    compression = run_compress(ctx, cfg, lineage)
    return ctx, cfg, lineage, compression


def test_the_chosen_candidate_is_registered_with_the_uncompressed_parent_in_its_lineage(shipped):
    ctx, cfg, lineage, comp = shipped
    assert comp["chosen"] in ("prune_structured", "prune_structured+nf4")
    assert comp["shipped"] == {"method": comp["chosen"], "version": comp["model_version"],
                               "model_dir": str(ctx.ws.model_dir("compress") / comp["chosen"])}
    tags = registry.version_tags("ship", comp["model_version"])
    assert tags["stage"] == "compress" and tags["compression"] == comp["chosen"]
    assert tags["parent_version"] == tags["uncompressed_version"] == lineage[-1].version
    # the uncompressed model stays registered beside it
    assert registry.version_tags("ship", lineage[-1].version)["stage"] == "sft"


def test_the_gate_judges_the_compressed_model_and_champion_moves_to_it(shipped):
    from tasks.gate import gate_and_promote, shipped_lineage

    ctx, cfg, lineage, comp = shipped
    ship = shipped_lineage(ctx, cfg, lineage, comp)
    assert ship.version == comp["model_version"] and ship.parent_metrics is lineage[-1].metrics
    verdict = gate_and_promote(ctx, cfg, lineage, ship, compression=comp["chosen"])
    gate = verdict["gate"]
    assert gate["passed"], gate["reasons"]
    assert gate["candidate"] == {"stage": "compress", "version": comp["model_version"], "compression": comp["chosen"],
                                 "uncompressed_version": lineage[-1].version, "evaluated_as": "sft"}
    assert gate["compared_with"]["uncompressed"] == lineage[-1].version
    assert {r["against"] for r in gate["rules"]} >= {"parent", "uncompressed"}
    assert any(r["rule"] == "task_within_limit" for r in gate["rules"])
    assert registry.alias_version("ship", registry.CHAMPION) == comp["model_version"]
    assert registry.alias_version("ship", registry.CHALLENGER) == comp["model_version"]
    assert registry.version_tags("ship", comp["model_version"])["gate"] == "passed"


def test_planted_ten_point_loss_in_the_shipped_model_is_never_promoted(shipped):
    from tasks.gate import gate_and_promote, shipped_lineage

    ctx, cfg, lineage, comp = shipped
    strict = cfg.model_copy(deep=True)
    strict.compress.select.max_task_drop_points = 2.0
    champion_before = registry.alias_version("ship", registry.CHAMPION)
    ship = shipped_lineage(ctx, strict, lineage, comp)
    trained = copy.deepcopy(lineage[-1])

    def plant(res: dict, f1: float) -> None:  # every item's instruct token F1 set to f1
        t = res["sw_instruct"]
        t["samples"]["token_f1"] = [f1] * len(t["samples"]["token_f1"])
        t["token_f1"] = f1

    plant(trained.parent_metrics, 0.40)   # the training parent
    plant(trained.metrics, 0.60)          # the uncompressed model
    plant(ship.metrics, 0.50)             # shipped: still above the training parent, 10 points below uncompressed
    ship.parent_metrics = trained.metrics
    verdict = gate_and_promote(ctx, strict, [lineage[0], trained], ship, compression=comp["chosen"])
    gate = verdict["gate"]
    first = gate["tried"][0]
    assert first["candidate"]["version"] == ship.version and not first["passed"]
    assert first["reasons"][0].startswith("compression cost: target sw_instruct.token_f1 dropped")
    assert registry.version_tags("ship", ship.version)["gate"] == "failed"
    # the fallback order's next candidate, the uncompressed model (+20 points over its parent), passes
    assert gate["passed"] and gate["fallback"] and gate["candidate"]["version"] == trained.version
    assert champion_before == ship.version != trained.version
    assert registry.alias_version("ship", registry.CHAMPION) == trained.version


def test_promote_and_rollback_work_on_compressed_versions(shipped):
    ctx, cfg, lineage, comp = shipped
    registry.promote("ship", lineage[-1].version, gate_passed=False, force_reason="test: uncompressed back")
    assert registry.alias_version("ship", registry.CHAMPION) == lineage[-1].version
    assert registry.rollback("ship") == comp["model_version"]           # previous champion: the compressed one
    assert registry.alias_version("ship", registry.CHAMPION) == comp["model_version"]
    # the shipped version downloads and reloads as the model that was measured
    from stagewise.compression.measure import load_candidate

    folder = registry.download_model("ship", comp["model_version"], Path(ctx.root) / "dl")
    m = load_candidate(folder)
    assert m.config.intermediate_size == load_candidate(comp["shipped"]["model_dir"]).config.intermediate_size
