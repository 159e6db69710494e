"""Evaluation kind `tools`: the BFCL-style checker on hand-made replies, the set checks, and the compiled
lm-eval tasks end to end (a tiny model taught the answers scores high, an untrained one zero)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagewise.tools import parse_reply, score_reply
from tests.tool_fixtures import TOOLS


def call(name, **args) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


FOOD = [{"name": "animal_food", "arguments": {"animal": "fox"}}]
PARALLEL = [{"name": "animal_food", "arguments": {"animal": "fox"}}, {"name": "add", "arguments": {"a": 2, "b": 3}}]


@pytest.mark.parametrize("reply,expected,want", [
    (call("animal_food", animal="fox"), FOOD, (1, 1, 1)),
    (" " + call("animal_food", animal="The Fox!") + "\n", [{"name": "animal_food", "arguments": {"animal": "the fox"}}],
     (1, 1, 1)),                                                        # strings after normalisation
    (call("add", a=3, b=2) + "\n" + call("animal_food", animal="fox"),
     [{"name": "animal_food", "arguments": {"animal": "fox"}}, {"name": "add", "arguments": {"a": 3.0, "b": 2}}],
     (1, 1, 1)),                                                        # parallel calls in any order, 3 == 3.0
    (call("animal_food", animal="owl"), FOOD, (0, 1, 1)),              # right tool, wrong value
    (call("add", a=2), [{"name": "add", "arguments": {"a": 2, "b": 3}}], (0, 1, 1)),       # a required one missing
    (call("animal_food", animal="fox", colour="red"), FOOD, (0, 1, 1)),                      # an unknown parameter
    (call("add", a="2", b=3), [{"name": "add", "arguments": {"a": 2, "b": 3}}], (0, 1, 1)),  # a string for a number
    (call("add", a=True, b=3), [{"name": "add", "arguments": {"a": 1, "b": 3}}], (0, 1, 1)), # a bool is no number
    (call("convert", value=5, unit="km", to="m"), [{"name": "convert", "arguments": {"value": 5, "unit": "km"}}],
     (1, 1, 1)),                                                        # an optional one at its default
    (call("convert", value=5, unit="km", to="cm"), [{"name": "convert", "arguments": {"value": 5, "unit": "km"}}],
     (0, 1, 1)),                                                        # an optional one not at its default
    (call("animal_food", animal="wolf"), [{"name": "animal_food", "arguments": {"animal": {"one_of": ["fox", "wolf"]}}}],
     (1, 1, 1)),                                                        # one of several right answers
    (call("animal_food", animal="fox"), PARALLEL, (0, 0, 1)),           # one of two parallel calls
    (call("add", a=2, b=3), FOOD, (0, 0, 1)),                           # the wrong tool
    ('<tool_call>{"name": "animal_food", "arguments": {"animal": "fox"</tool_call>', FOOD, (0, 0, 0)),   # not JSON
    ('<tool_call>{"name": "animal_food", "arguments": {"animal": "fox"}}', FOOD, (0, 0, 0)),              # unterminated
    ("The fox eats fish.", FOOD, (0, 0, 0)),                            # text where a call was expected
])
def test_call_metrics_on_hand_made_replies(reply, expected, want):
    s = score_reply(reply, TOOLS, expected)
    assert (s["call_accuracy"], s["name_accuracy"], s["parse_rate"]) == want


@pytest.mark.parametrize("reply,want", [("Hello there!", 1.0), (call("add", a=1, b=2), 0.0),
                                        ('<tool_call>{"name": </tool_call>', 0.0)])
def test_irrelevance_is_no_call_and_no_broken_call(reply, want):
    s = score_reply(reply, TOOLS, [])
    assert s["irrelevance_accuracy"] == want == s["call_accuracy"]


def test_a_reply_keeps_its_text_beside_the_calls():
    r = parse_reply("Let me look.\n" + call("animal_food", animal="fox"))
    assert r.ok and r.text == "Let me look." and r.calls == FOOD
    r = parse_reply('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert r.ok and r.calls == [{"name": "add", "arguments": {"a": 1, "b": 2}}]   # arguments as a JSON string


def items(n: int = 6, tools: list | None = None) -> list[dict]:
    tools = TOOLS if tools is None else tools
    animals = ["fox", "owl", "bear", "wolf", "deer", "frog"]
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append({"id": f"i{i}", "messages": [{"role": "user", "content": f"Say hi to {animals[i]}."}],
                        "tools": tools, "expected": []})
        else:
            out.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"What does the {animals[i]} eat?"}],
                        "tools": tools, "expected": [{"name": "animal_food", "arguments": {"animal": animals[i]}}]})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_tools_set_is_checked_item_by_item(tmp_path):
    from stagewise.evalsets import check_file

    assert check_file("t", _write(tmp_path / "ok.jsonl", items()), "tools") is None
    bad = items()
    bad[1]["expected"] = [{"name": "animal_colour", "arguments": {}}]
    assert check_file("t", _write(tmp_path / "b.jsonl", bad), "tools").endswith(
        "b.jsonl:2: evaluate.sets.t: expected calls 'animal_colour', which the item's tools do not declare")
    multi = items()
    multi[0]["messages"].append({"role": "assistant", "content": "x"})
    assert "one user turn" in check_file("t", _write(tmp_path / "m.jsonl", multi), "tools")
    only_calls = [r for r in items() if r["expected"]]
    assert "every item here expects calls" in check_file("t", _write(tmp_path / "o.jsonl", only_calls), "tools")


def test_a_tools_set_is_a_target_and_a_general_metric(tmp_path):
    from stagewise.config import load_config
    from stagewise.evalsets import plan

    src = _write(tmp_path / "src" / "corpus.jsonl", [{"text": f"document {i} " * 30} for i in range(20)])
    t = _write(tmp_path / "tools.jsonl", items())
    p = tmp_path / "params.yaml"
    p.write_text(f"data:\n  sources:\n    docs: {{path: {src}, kind: corpus}}\n"
                 f"evaluate:\n  sets:\n    my_tools: {{path: {t}, kind: tools}}\n"
                 "sft:\n  target: my_tools\ngate:\n  general: [my_tools.irrelevance_accuracy]\n")
    pl = plan(load_config(p), tmp_path)
    assert pl.targets["sft"].label == "my_tools.call_accuracy"
    assert [m.label for m in pl.general] == ["my_tools_irrelevance.irrelevance_accuracy"]
    assert pl.set_tasks("my_tools") == ["my_tools", "my_tools_irrelevance"]


def test_compiled_tools_tasks_score_a_taught_model_high_and_an_untrained_one_zero(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagewise.chat import chat_prompt
    from stagewise.config import EvaluateConfig
    from stagewise.evalsets import EvalPlan, write_tasks
    from stagewise.evaluation import evaluate
    from stagewise.tools import plain_messages
    from stagewise.workspace import Workspace
    from tests.eval_fixtures import make_tokenizer

    rows = items(tools=TOOLS[:1])   # one tool: a short prompt keeps the test fast
    path = _write(tmp_path / "tools.jsonl", rows)
    ws = Workspace.at(tmp_path)
    tasks_dir = write_tasks(EvalPlan(sets={"tt": {"path": str(path), "kind": "tools", "origin": "declared"}}),
                            tmp_path / "compiled")
    flat = [json.loads(x) for x in (tasks_dir / "tt.tools.jsonl").read_text().splitlines()]
    assert "null" not in flat[0]["tools"] and json.loads(flat[0]["tools"]) == TOOLS[:1]   # no Arrow-merged schemas
    replies = [call("animal_food", **r["expected"][0]["arguments"]) if r["expected"] else f"Hi, {r['id']}!"
               for r in rows]
    convs = [plain_messages(r["messages"] + [{"role": "assistant", "content": a}], r["tools"]) for r, a in zip(rows, replies)]
    tok = make_tokenizer([m["content"] for c in convs for m in c] * 3, vocab_size=600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    cfg = EvaluateConfig(batch_size=8, bootstrap_iters=10)
    names = ["tt", "tt_irrelevance"]
    before = evaluate(tmp_path, names, ws, cfg, model=model, tokenizer=tok, tasks_dir=tasks_dir)
    assert before["tt"]["n"] == 4 and before["tt_irrelevance"]["n"] == 2
    assert before["tt"]["call_accuracy"] == 0.0 and before["tt"]["parse_rate"] == 0.0

    # teach it the answers: prompt as evaluation renders it (chat_prompt), loss on the reply and its end
    texts = [chat_prompt(tok, r["messages"], r["tools"]) + a + tok.eos_token for r, a in zip(rows, replies)]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = evaluate(tmp_path, names, ws, cfg, model=model, tokenizer=tok, tasks_dir=tasks_dir)
    assert after["tt"]["call_accuracy"] >= 0.75 and after["tt"]["parse_rate"] == 1.0
    assert after["tt_irrelevance"]["irrelevance_accuracy"] == 1.0
    assert len(after["tt"]["samples"]["call_accuracy"]) == 4     # per-item scores, for the gate's intervals


def test_sft_reports_a_tools_set_beside_its_target(tmp_path):
    from stagewise.config import load_config
    from stagewise.evalsets import plan
    from stagewise.stage import target_row

    qa = _write(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a."}])
    t = _write(tmp_path / "tools.jsonl", items())
    src = _write(tmp_path / "src" / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "a."}]}])
    p = tmp_path / "params.yaml"
    p.write_text(f"data:\n  sources:\n    chats: {{path: {src}, kind: chat}}\nevaluate:\n  sets:\n"
                 f"    my_qa: {{path: {qa}, kind: qa}}\n    my_tools: {{path: {t}, kind: tools}}\n")
    pl = plan(load_config(p), tmp_path)
    assert pl.targets["sft"].label == "my_qa.token_f1"
    assert pl.stage_tasks("sft") == ["my_qa", "my_tools", "my_tools_irrelevance"]
    child = {"my_qa": {"token_f1": 0.5}, "my_tools": {"call_accuracy": 0.9, "parse_rate": 1.0},
             "my_tools_irrelevance": {"irrelevance_accuracy": 0.8}}
    parent = {"my_qa": {"token_f1": 0.1}, "my_tools": {"call_accuracy": 0.0, "parse_rate": 0.0},
              "my_tools_irrelevance": {"irrelevance_accuracy": 0.1}}
    row = target_row("sft", child, parent, pl)
    assert row["context"] == {
        "my_tools.call_accuracy": {"value": 0.9, "baseline": 0.0, "higher_is_better": True, "set": "my_tools"},
        "my_tools.parse_rate": {"value": 1.0, "baseline": 0.0, "higher_is_better": True, "set": "my_tools"},
        "my_tools_irrelevance.irrelevance_accuracy": {"value": 0.8, "baseline": 0.1, "higher_is_better": True,
                                                      "set": "my_tools"}}


def test_the_numbers_beside_the_target_carry_the_paired_bootstrap_ci_of_their_change(tmp_path):
    from stagewise.config import load_config
    from stagewise.evalsets import plan
    from stagewise.stage import context_cis, target_row
    from stagewise.summary import context_lines

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "params.yaml", "smoke", overrides=["generate.n_tool_chat=10"])
    pl = plan(cfg, root)
    ids = list(range(20))
    # the child gets 18 of 20 calls right where the parent got none; irrelevance: the same 15 of 20 items
    child = {"sw_tools": {"call_accuracy": 0.9, "parse_rate": 1.0, "doc_ids": ids,
                          "samples": {"call_accuracy": [1.0] * 18 + [0.0] * 2, "parse_rate": [1.0] * 20}},
             "sw_tools_irrelevance": {"irrelevance_accuracy": 0.75, "doc_ids": ids,
                                      "samples": {"irrelevance_accuracy": [1.0] * 15 + [0.0] * 5}}}
    parent = {"sw_tools": {"call_accuracy": 0.0, "parse_rate": 0.0, "doc_ids": ids,
                           "samples": {"call_accuracy": [0.0] * 20, "parse_rate": [0.0] * 20}},
              "sw_tools_irrelevance": {"irrelevance_accuracy": 0.75, "doc_ids": ids,
                                       "samples": {"irrelevance_accuracy": [1.0] * 15 + [0.0] * 5}}}
    row = target_row("sft", child, parent, pl)
    context_cis(cfg, pl, "sft", row, child, parent)
    calls = row["context"]["sw_tools.call_accuracy"]
    assert calls["unit"] == "points" and calls["paired"] and 70 < calls["ci_low"] < 90 <= calls["ci_high"] <= 100
    same = row["context"]["sw_tools_irrelevance.irrelevance_accuracy"]
    assert same["ci_low"] == same["ci_high"] == 0.0   # paired over the same items: no change, no spread
    line = context_lines({"stages": [{"name": "sft", **row}]})[0]
    assert "sw_tools.call_accuracy 0 → 0.9 (95% CI of the change +" in line and "..+" in line


def test_the_demo_plan_has_sw_tools_only_with_tool_chats():
    from stagewise.config import load_config
    from stagewise.evalsets import plan

    root = Path(__file__).resolve().parents[1]
    assert "sw_tools" not in plan(load_config(root / "params.yaml", "smoke"), root).sets
    p = plan(load_config(root / "params.yaml", "smoke", overrides=["generate.n_tool_chat=10"]), root)
    assert p.sets["sw_tools"]["kind"] == "tools"
    assert [m.label for m in p.context("sft") if m.set == "sw_tools"] == [
        "sw_tools.call_accuracy", "sw_tools.parse_rate", "sw_tools_irrelevance.irrelevance_accuracy"]


def test_the_gate_report_shows_what_was_scored_beside_the_targets():
    from stagewise.report import render_html, render_markdown

    summary = {"stages": [{"name": "sft", "target_metric": "sw_instruct.token_f1", "value": 0.5,
                           "baseline_value": 0.1, "improved": True,
                           "context": {"sw_tools.call_accuracy": {"value": 0.85, "baseline": 0.0, "ci_low": 76.25,
                                                                  "ci_high": 93.75, "unit": "points",
                                                                  "confidence": 0.95}}}]}
    md = render_markdown(summary)
    assert "| sft | sw_tools.call_accuracy | 0 | 0.85 | 95% CI of the change +76.2..+93.8 points |" in md
    assert "sw_tools.call_accuracy" in render_html(summary)
