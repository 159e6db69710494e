"""Tool-use chat records through curation: kept when sound, quarantined with file:line and a reason when not."""

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stagewise.cli_data import data_app
from stagewise.config import DataConfig, IngestConfig, QualityConfig, SourceConfig, ValidateConfig
from stagewise.records import BadInput, dedup_text, prompt_texts, write_jsonl
from tasks.ingest import ingest
from tasks.quality import quality
from tasks.validate import ValidationFailed, validate
from tests.tool_fixtures import multi_call_chat, no_tool_chat


def bad_records() -> dict[str, dict]:
    undeclared = multi_call_chat(90)
    undeclared["messages"][2]["tool_calls"][0]["function"]["name"] = "animal_colour"
    not_json = multi_call_chat(91)
    not_json["messages"][2]["tool_calls"][1]["function"]["arguments"] = '{"a": 91, "b": '
    wrong_schema = multi_call_chat(92)
    wrong_schema["messages"][2]["tool_calls"][1]["function"]["arguments"] = {"a": "ninety", "b": 3}
    unknown_param = multi_call_chat(93)
    unknown_param["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"animal": "fox", "when": "now"}
    unmatched = multi_call_chat(94)
    unmatched["messages"][4]["tool_call_id"] = "c9"
    return {"tool_undeclared": undeclared, "tool_bad_arguments": not_json, "wrong_schema": wrong_schema,
            "unknown_param": unknown_param, "tool_unmatched_result": unmatched}


def curate(*args) -> tuple[int, str]:
    r = CliRunner().invoke(data_app, ["curate", *map(str, args)])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def test_bad_tool_records_are_quarantined_with_line_and_reason_and_the_run_goes_on(tmp_path):
    good = [multi_call_chat(i) for i in range(3)] + [no_tool_chat(0)]
    bad = bad_records()
    src = tmp_path / "chats.jsonl"
    write_jsonl(src, good[:2] + list(bad.values()) + good[2:])
    code, out = curate("-i", src, "-o", tmp_path / "o.jsonl", "-r", tmp_path / "r.json", "--kind", "chat",
                       "--on-bad-rows", "quarantine")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input"] == 9 and report["kept"] == 4 and report["quarantined"] == 5
    assert report["removed_counts"] == {"tool_undeclared": 1, "tool_bad_arguments": 3, "tool_unmatched_result": 1}
    entries = [json.loads(line) for line in Path(report["quarantine"]).read_text().splitlines()]
    by_line = {e["line"]: e for e in entries}
    assert sorted(by_line) == [3, 4, 5, 6, 7]                    # 1-based lines of the bad records
    assert by_line[3]["reason"] == "tool_undeclared" and "animal_colour" in by_line[3]["problem"]
    assert by_line[4]["reason"] == "tool_bad_arguments" and "not JSON" in by_line[4]["problem"]
    assert by_line[5]["reason"] == "tool_bad_arguments" and "ninety" in by_line[5]["problem"]
    assert by_line[6]["reason"] == "tool_bad_arguments" and "when" in by_line[6]["problem"]
    assert by_line[7]["reason"] == "tool_unmatched_result" and "c9" in by_line[7]["problem"]
    kept = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["t-0", "t-1", "t-2", "n-0"]
    assert kept[0]["tools"] and kept[0]["messages"][2]["tool_calls"]   # tools and calls survive curation


def test_a_bad_tool_record_stops_ingest_naming_file_and_line_by_default(tmp_path):
    src = tmp_path / "chats.jsonl"
    write_jsonl(src, [multi_call_chat(0), bad_records()["tool_undeclared"]])
    cfg = DataConfig(sources={"s": SourceConfig(path=str(src), kind="chat")})
    with pytest.raises(BadInput) as err:
        ingest(cfg, IngestConfig(), tmp_path, tmp_path / "out")
    assert err.value.line == 2 and err.value.code == "tool_undeclared" and str(src) in str(err.value)


def test_null_content_on_a_call_only_turn_is_read_as_empty(tmp_path):
    rec = multi_call_chat(0)
    rec["messages"][2]["content"] = None
    src = write_jsonl(tmp_path / "c.jsonl", [rec]) and tmp_path / "c.jsonl"
    stats = ingest(DataConfig(sources={"s": SourceConfig(path=str(src), kind="chat")}), IngestConfig(), tmp_path,
                   tmp_path / "out")
    assert stats["kept"] == {"chat": 1}
    row = json.loads((tmp_path / "out" / "chat.jsonl").read_text())
    assert row["messages"][2]["content"] == ""


def test_quality_judges_language_turns_and_dedup_sees_the_whole_exchange(tmp_path):
    a, b = multi_call_chat(0), multi_call_chat(0)
    b["id"] = "t-0b"
    b["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"animal": "owl"}   # same words, another call
    write_jsonl(tmp_path / "in" / "chat.jsonl", [a, b, no_tool_chat(1)])
    stats = quality(QualityConfig(), tmp_path / "in", tmp_path / "out")
    assert stats["removed"] == {}          # an assistant turn with only calls is not an empty response
    assert dedup_text("chat", a) != dedup_text("chat", b)
    assert '"animal": "owl"' in dedup_text("chat", b) and "tool: fish" in dedup_text("chat", a)
    assert any("animal_food" in t for t in prompt_texts("chat", a))  # decontamination sees the calls too
    # a call-only turn still counts as empty when it has no call
    c = copy.deepcopy(a)
    c["messages"][2].pop("tool_calls")
    c["messages"] = c["messages"][:3] + [{"role": "user", "content": "And?"}, c["messages"][5]]
    write_jsonl(tmp_path / "in2" / "chat.jsonl", [c])
    assert quality(QualityConfig(), tmp_path / "in2", tmp_path / "out2")["removed"] == {"chat_empty_response": 1}


def test_great_expectations_checks_the_calls_against_the_declared_tools(tmp_path):
    good = tmp_path / "good"
    write_jsonl(good / "corpus.jsonl", [{"id": "c1", "text": "A document."}])
    write_jsonl(good / "chat.jsonl", [multi_call_chat(0), no_tool_chat(0)])
    stats = validate(ValidateConfig(), good, tmp_path / "out")
    assert stats["expectations"]["chat"]["success"]
    bad = tmp_path / "bad"
    write_jsonl(bad / "corpus.jsonl", [{"id": "c1", "text": "A document."}])
    write_jsonl(bad / "chat.jsonl", [multi_call_chat(0), {**bad_records()["tool_unmatched_result"], "id": "x9"}])
    with pytest.raises(ValidationFailed) as err:
        validate(ValidateConfig(), bad, tmp_path / "out_bad")
    assert "tool_problem" in str(err.value) and "'x9'" in str(err.value)


def test_the_demo_worlds_tool_chats_are_sound_and_hold_out_their_eval_values(tmp_path):
    from stagewise.config import GenerateConfig
    from stagewise.records import check_record, read_jsonl
    from tasks.generate import TOOL_EVAL_ANIMALS, TOOL_EVAL_SUMS, generate

    generate(GenerateConfig(n_docs=40, n_chat=60, n_preference=20, n_verifiable=20, n_eval=40, n_tool_chat=80), tmp_path)
    tools = [r for r in read_jsonl(tmp_path / "chat.jsonl") if r.get("tools")]
    assert len(tools) == 80
    calls = [c["function"] for r in tools for m in r["messages"] for c in m.get("tool_calls") or []]
    for r in tools:
        check_record("chat", r, r["id"])          # every call declared and matching its schema, results matched
    assert {c["name"] for c in calls} == {"food", "color", "add", "km_to_m"}
    assert any(len(m.get("tool_calls") or []) == 2 for r in tools for m in r["messages"])   # parallel calls
    assert any(not any(m.get("tool_calls") for m in r["messages"]) for r in tools)          # no tool needed
    bench = read_jsonl(tmp_path / "benchmarks" / "tools.jsonl")
    assert len(bench) == 40 and any(not b["expected"] for b in bench)
    seen_args = {json.dumps(c["arguments"], sort_keys=True) for c in calls}
    for b in bench:
        for c in b["expected"]:
            assert json.dumps(c["arguments"], sort_keys=True) not in seen_args      # unseen argument values
            if c["name"] in ("food", "color"):
                assert c["arguments"]["animal"] in TOOL_EVAL_ANIMALS
            if c["name"] == "add":
                assert (c["arguments"]["a"], c["arguments"]["b"]) in TOOL_EVAL_SUMS
    pairs = {tuple(c["name"] for c in b["expected"]) for b in bench if len(b["expected"]) == 2}
    train_pairs = {tuple(c["function"]["name"] for c in m["tool_calls"]) for r in tools for m in r["messages"]
                   if len(m.get("tool_calls") or []) == 2}
    assert pairs - train_pairs                                                      # unseen combinations


@pytest.mark.parametrize("share", [0.15, 0.4])
def test_the_no_call_share_of_the_tool_chats_is_the_setting(share):
    """generate.tool_no_call_share: that share of the tool chats needs no tool (binomial 99% band), each
    question once, none phrased like the eval's no-call items ("Wish … a good day.")."""
    import math
    import random

    from tasks.generate import build_world, tool_chats

    n = 300
    chats = tool_chats(build_world(random.Random(7)), n, random.Random(8), share)
    no_call = [r for r in chats if not any(m.get("tool_calls") for m in r["messages"])]
    sd = math.sqrt(n * share * (1 - share))
    assert abs(len(no_call) - n * share) < 2.6 * sd, (len(no_call), n * share)
    questions = [r["messages"][0]["content"] for r in chats]
    assert len(set(questions)) == n
    assert not any(q.startswith("Wish") for q in questions)
