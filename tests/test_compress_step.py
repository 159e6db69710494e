"""The compress step: candidates written, measured, evaluated, one chosen by the policy, report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress_fixtures import compress_env, cpu_4bit_kernel  # noqa: F401  (session fixture)
from stagewise.config import Config
from tasks.compress import check, compress, select


def _cand(method, mem, metrics, tps=1000.0):
    return {"method": method, "memory_bytes": mem, "bytes": mem, "params": mem, "metrics": metrics,
            "tokens_per_s": tps, "tokens_per_s_batched": tps}


def _score(cfg, parent, cands):
    for c in cands:
        c["check"] = check(cfg, parent["metrics"], c["metrics"])
    sel = select(cfg, parent, cands)
    return sel["chosen"], sel["reason"]


def test_policy_picks_the_smallest_within_limits_and_guard():
    cfg = Config()
    parent = _cand("parent", 100, {"sw_instruct/exact_match": 0.80, "sw_general_mc/acc": 0.60,
                                   "sw_general_text/word_perplexity": 20.0})
    cands = [
        _cand("nf4", 25, {"sw_instruct/exact_match": 0.77, "sw_general_mc/acc": 0.60,          # -3 points: too far
                          "sw_general_text/word_perplexity": 20.5}),
        _cand("prune_structured", 60, {"sw_instruct/exact_match": 0.79, "sw_general_mc/acc": 0.59,
                                       "sw_general_text/word_perplexity": 21.0}),
        _cand("distill", 40, {"sw_instruct/exact_match": 0.81, "sw_general_mc/acc": 0.60,       # forgets: ppl +15%
                              "sw_general_text/word_perplexity": 23.0}),
        _cand("int8", 50, {"sw_instruct/exact_match": 0.80, "sw_general_mc/acc": 0.60,
                           "sw_general_text/word_perplexity": 20.1}),
    ]
    chosen, reason = _score(cfg, parent, cands)
    assert chosen == "int8"
    assert cands[0]["check"]["failed"] == ["sw_instruct/exact_match: drop points 3.00 > 2.0"]
    assert any("word_perplexity" in f for f in cands[2]["check"]["failed"])
    assert "2.00x smaller" in reason


def test_policy_keeps_the_parent_when_nothing_passes_and_says_why():
    cfg = Config()
    parent = _cand("parent", 100, {"task_nll": 2.0, "general_nll": 3.0})
    cands = [_cand("distill", 30, {"task_nll": 2.5, "general_nll": 3.0})]
    chosen, reason = _score(cfg, parent, cands)
    assert chosen is None and "uncompressed parent ships" in reason and "task_nll" in reason


def test_policy_uses_the_configured_task_metric_and_ignores_stderr():
    cfg = Config.model_validate({"compress": {"select": {"task_metric": "arith/exact_match", "max_task_drop_points": 5}}})
    parent = _cand("parent", 100, {"instruct/exact_match": 0.8, "arith/exact_match": 0.5, "arith/exact_match_stderr": 0.1})
    c = _cand("nf4", 30, {"instruct/exact_match": 0.1, "arith/exact_match": 0.46})
    chosen, _ = _score(cfg, parent, [c])
    assert chosen == "nf4" and c["check"]["task_metric"] == "arith/exact_match"


def test_compress_end_to_end(compress_env, tmp_path):  # noqa: F811
    from stagewise.modeling import load_model, load_tokenizer, save_model

    ws, parent_dir, base_cfg = compress_env
    # a second checkpoint from the same base, so `merge` has something to merge with
    tok = load_tokenizer(parent_dir)
    sibling = load_model(parent_dir)
    import torch

    with torch.no_grad():
        for p in sibling.parameters():
            p.add_(0.01 * torch.randn_like(p))
    other = save_model(sibling, tok, tmp_path / "sibling")

    cfg = base_cfg.model_copy(deep=True)
    cfg.compress.methods = ["nf4", "dynamic_int8", "prune_structured", "merge"]
    cfg.compress.merge.method = "linear"  # no base checkpoint in this workspace
    calls = []

    def evaluate_fn(model_dir: Path) -> dict:  # what the flow passes: a folder in, metrics out
        calls.append(Path(model_dir).name)
        from stagewise.compression.measure import load_candidate
        from stagewise.modeling import mean_nll

        texts = [json.loads(line)["text"] for line in (ws.benchmarks / "general_text.jsonl").read_text().splitlines()[:8]]
        return {"general_nll": mean_nll(load_candidate(model_dir), tok, texts), "task_acc": 0.5}

    out_root = tmp_path / "compress"
    res = compress(cfg, parent_dir, ws, out_root, evaluate_fn=evaluate_fn, merge_with=[other])
    by = {c["method"]: c for c in res["candidates"]}
    assert list(by) == ["nf4", "dynamic_int8", "prune_structured", "merge"]
    for c in res["candidates"]:
        assert {"method", "model_dir", "params", "bytes", "memory_bytes", "tokens_per_s", "metrics", "parent"} <= set(c)
        assert c["tokens_per_s"] > 0 and c["parent"] == str(parent_dir)
    # folder-only evaluator: the in-memory recipe candidate is reported, not evaluated, never chosen
    assert "dynamic_int8" not in calls and by["dynamic_int8"]["metrics"] == {}
    assert sorted(calls) == sorted(["parent", "nf4", "prune_structured", "merge"])
    assert by["nf4"]["memory_bytes"] < res["parent_measure"]["memory_bytes"] / 2
    # default prune: half of every layer's MLP neurons (-32% on the demo shape; -30% on this tiny one)
    assert by["prune_structured"]["info"]["intermediate_size"] == 192 // 2
    assert by["prune_structured"]["params"] < 0.71 * res["parent_measure"]["params"]
    assert by["prune_structured"]["info"]["recovery_data"] == "task" and by["prune_structured"]["info"]["recovery_alpha"] == 0.5
    assert res["chosen"] in {"nf4", "prune_structured", "merge", None}
    if res["chosen"]:
        assert by[res["chosen"]]["check"]["passed"]
    assert Path(res["plot"]).stat().st_size > 1000 and res["plot"] == str(out_root / "pareto.png")
    assert json.loads((out_root / "compress.json").read_text())["chosen"] == res["chosen"]
    assert "| nf4" in res["table"]
    assert not (out_root / ".work").exists()
    from stagewise import machine

    # the tokens/s above are facts of this machine: recorded with them (issue 22)
    assert res["machine"]["kind"] == machine.describe()["kind"] and res["machine"]["threads"] >= 1
    assert json.loads((out_root / "compress.json").read_text())["machine"] == res["machine"]


def test_merge_without_checkpoints_is_skipped_with_a_reason(compress_env, tmp_path):  # noqa: F811
    ws, parent_dir, base_cfg = compress_env
    cfg = base_cfg.model_copy(deep=True)
    cfg.compress.methods = ["merge"]
    res = compress(cfg, parent_dir, ws, tmp_path / "c")
    assert res["candidates"][0]["error"].startswith("skipped: nothing to merge with")
    assert res["chosen"] is None


def test_unknown_method_is_a_config_error():
    with pytest.raises(Exception, match="methods"):
        Config.model_validate({"compress": {"methods": ["nf3"]}})


def test_a_drop_exactly_at_the_limit_passes():
    # 100 × (0.17 − 0.15) is 2.0000000000000018 in floating point: still a 2-point drop
    cfg = Config()
    parent = _cand("parent", 100, {"sw_arithmetic/exact_match": 0.17})
    c = _cand("prune_structured", 60, {"sw_arithmetic/exact_match": 0.15})
    chosen, _ = _score(cfg, parent, [c])
    assert chosen == "prune_structured" and c["check"]["deltas"]["sw_arithmetic/exact_match"] == {"drop_points": 2.0}


def test_a_chain_applies_its_links_in_order_each_from_the_previous_output(compress_env, tmp_path):  # noqa: F811
    import torch

    from stagewise.compression.measure import load_candidate

    ws, parent_dir, base_cfg = compress_env
    cfg = base_cfg.model_copy(deep=True)
    cfg.compress.methods = ["prune_structured", "prune_structured+nf4", "distill+prune_structured"]
    cfg.compress.select.min_speed_ratio = 0.0
    out_root = tmp_path / "c"
    # on bitsandbytes' AVX-512-BF16 CPU path, whatever this CPU is: the pruned down_proj (96 inputs)
    # is a shape its 4-bit kernel refuses, so that link keeps it in full precision and says so
    with cpu_4bit_kernel(True):
        res = compress(cfg, parent_dir, ws, out_root,
                       evaluate_fn=lambda d: {"task_acc": 0.5, "general_acc": 0.5})
    by = {c["method"]: c for c in res["candidates"]}
    chain = by["prune_structured+nf4"]["info"]
    assert chain["chain"] == ["prune_structured", "nf4"]
    assert chain["full_precision_layers"] == chain["links"][1]["info"]["full_precision_layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    first, second = chain["links"]
    # link 1 is the already-built prune_structured candidate (reused, not pruned twice); link 2 quantizes it
    assert first["from"] == str(parent_dir) and first["to"] == str(out_root / "prune_structured") and first["reused"]
    assert second["from"] == first["to"] and second["to"] == str(out_root / "prune_structured+nf4")
    model = load_candidate(out_root / "prune_structured+nf4")
    assert model.config.intermediate_size == 192 // 2          # pruned first ...
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"   # ... then quantized
    # every 4-bit layer saves >= 80% of its fp32 bytes (NF4 + constants); the refused down_proj saves nothing
    quantized_fp32 = sum(m.in_features * m.out_features * 4 for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert by["prune_structured+nf4"]["memory_bytes"] <= by["prune_structured"]["memory_bytes"] - 0.8 * quantized_fp32
    # distill, then prune the student: the pruned model has the student's depth and half its MLP
    d = by["distill+prune_structured"]["info"]
    assert [x["link"] for x in d["links"]] == ["distill", "prune_structured"]
    student = load_candidate(out_root / "distill")
    final = load_candidate(out_root / "distill+prune_structured")
    assert final.config.num_hidden_layers == student.config.num_hidden_layers == 1
    assert final.config.intermediate_size == student.config.intermediate_size // 2
    assert not torch.equal(final.model.embed_tokens.weight, load_candidate(parent_dir).model.embed_tokens.weight)
    for c in res["candidates"]:
        assert c["tokens_per_s"] > 0 and c["tokens_per_s_batched"] > 0 and c["reloadable"]
    assert "| prune_structured+nf4" in res["table"]
