"""The `rag` evaluation kind: its metrics on hand-made replies, its items (the oracle among k
distractors, or distractors only), its config checks, and the compiled lm-eval tasks end to end on
tiny models (a random one and one that memorized the open-book replies)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from stagewise.evalsets import check_file, compile_set
from stagewise.rag import (
    ANSWER, BEGIN, END, EVAL_CHUNK_CHARS, EVAL_DISTRACTORS, EVAL_SEED, answer_part, eval_item, eval_pool, quote_valid,
    reply, supporting_quote)

REPO = Path(__file__).resolve().parents[1]


def utils():
    spec = importlib.util.spec_from_file_location("sw_eval_utils", REPO / "evals" / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DOC = {"answer": "Quellport", "shown": ["Zorbin lives in Quellport. He paints.", "Mira lives in Dunhold."]}


@pytest.mark.parametrize("text, em, f1, qv", [
    (f"{BEGIN}Zorbin lives in Quellport.{END} {ANSWER} Quellport", 1.0, 1.0, 1.0),
    (f"{ANSWER} quellport!", 1.0, 1.0, 0.0),                                       # right, but quotes nothing
    (f"{BEGIN}Zorbin lives in Quellport{END} {ANSWER} in Quellport", 0.0, 2 / 3, 1.0),  # partial credit
    (f"{BEGIN}Zorbin lives in Dunhold.{END} {ANSWER} Dunhold", 0.0, 0.0, 0.0),     # a made-up quote
    (f"{BEGIN}Mira lives in Dunhold.{END} {BEGIN}He sings.{END} {ANSWER} Dunhold", 0.0, 0.0, 0.0),  # one quote invented
    ("Quellport", 1.0, 1.0, 0.0),                                                 # no marker: the whole reply
], ids=["quoted", "unquoted", "partial", "invented_quote", "one_of_two_invented", "no_marker"])
def test_rag_results_on_hand_made_replies(text, em, f1, qv):
    got = utils().rag_results(DOC, [text])
    assert got == {"exact_match": em, "token_f1": pytest.approx(f1), "quote_valid": qv}


def test_reply_format_round_trips():
    quote = supporting_quote("Zorbin is tall. Zorbin lives in Quellport. He paints.", "Quellport")
    assert quote == "Zorbin lives in Quellport."
    text = reply("Quellport", quote)
    assert answer_part(text) == "Quellport" and quote_valid(text, ["Zorbin is tall. Zorbin lives in Quellport."]) == 1.0


ROWS = [{"id": f"r{i}", "question": f"Where does P{i} live?", "answer": f"Town{i}",
         "documents": [f"P{i} lives in Town{i}.", *[f"Q{i}x{j} lives in Else{j}." for j in range(6)]], "oracle": 0}
        for i in range(6)] + [{"id": "t", "question": "Where does Tov live?", "answer": "Rimby",
                               "oracle_text": "Tov lives in Rimby. Tov likes tea."}]


def test_eval_items_show_the_oracle_among_k_distractors_or_k_plus_1_distractors():
    pool = eval_pool(ROWS, EVAL_CHUNK_CHARS)
    for i, r in enumerate(ROWS):
        oracle = r["documents"][0] if "documents" in r else r["oracle_text"]
        on = eval_item(r, pool, i, True, EVAL_DISTRACTORS, EVAL_CHUNK_CHARS, EVAL_SEED)
        off = eval_item(r, pool, i, False, EVAL_DISTRACTORS, EVAL_CHUNK_CHARS, EVAL_SEED)
        assert len(on["shown"]) == len(set(on["shown"])) == len(off["shown"]) == EVAL_DISTRACTORS + 1
        assert oracle in on["shown"] and oracle not in off["shown"] and r["answer"] not in off["prompt"]
        assert set(on["shown"]) - {oracle} < set(off["shown"])     # the same distractors, one more in its place
        assert on == eval_item(r, pool, i, True, EVAL_DISTRACTORS, EVAL_CHUNK_CHARS, EVAL_SEED)   # seeded


def test_a_bad_rag_eval_row_is_an_error_naming_file_and_line(tmp_path):
    f = tmp_path / "rag.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "oracle": 9}) + "\n")
    assert check_file("mine", f, "rag").startswith(f"{f}:2: evaluate.sets.mine: oracle index 9 is outside documents")
    f.write_text(json.dumps({**ROWS[1], "answer": "Nowhere"}) + "\n")
    assert "answer 'Nowhere' does not occur in documents[0]" in check_file("mine", f, "rag")
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert check_file("mine", f, "rag") is None
    tasks = compile_set("mine", str(f), "rag")
    assert list(tasks) == ["mine", "mine_no_oracle"]
    assert tasks["mine_no_oracle"]["process_docs"] == "!function utils.rag_docs_no_oracle"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    import torch

    from eval_fixtures import eval_workspace, make_model, make_tokenizer, memorize, save_model, texts_of
    from stagewise.config import EvaluateConfig
    from stagewise.evaluation import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = eval_workspace(tmp_path_factory.mktemp("rageval") / "ws", n_eval=8)
    rows = [json.loads(x) for x in (ws.benchmarks / "rag.jsonl").read_text().splitlines()]
    pool = eval_pool(rows, EVAL_CHUNK_CHARS)
    items = [eval_item(r, pool, i, True, EVAL_DISTRACTORS, EVAL_CHUNK_CHARS, EVAL_SEED) for i, r in enumerate(rows)]
    tok = make_tokenizer(texts_of(ws) + [it["prompt"] for it in items] + [f"{BEGIN} {END} {ANSWER}"] * 4)
    random_dir = save_model(make_model(tok, hidden=48), tok, ws.root / "models" / "random")
    mem = make_model(tok, hidden=48)
    chats = [[{"role": "user", "content": it["prompt"]},
              {"role": "assistant", "content": reply(r["answer"], supporting_quote(r["documents"][r["oracle"]], r["answer"]))}]
             for r, it in zip(rows, items)]
    memorize(mem, tok, chats, steps=120, lr=5e-3)
    mem_dir = save_model(mem, tok, ws.root / "models" / "memorized")
    cfg = EvaluateConfig(batch_size=8, bootstrap_iters=100)
    tasks = ["sw_rag", "sw_rag_no_oracle"]
    yield evaluate(random_dir, tasks, ws, cfg), evaluate(mem_dir, tasks, ws, cfg)
    torch.set_num_threads(threads)


def test_the_compiled_rag_tasks_score_a_reader_high_and_a_random_model_low(scored):
    rand, mem = scored
    for res in (rand, mem):
        for task in ("sw_rag", "sw_rag_no_oracle"):
            assert res[task]["n"] == 8 and set(res[task]["samples"]) == {"token_f1", "exact_match", "quote_valid"}
    assert rand["sw_rag"]["quote_valid"] == 0.0 and rand["sw_rag"]["token_f1"] < 0.2
    # it memorized the replies to the oracle prompts: the prompt format, stop, answer part and quotes all work
    assert mem["sw_rag"]["token_f1"] >= 0.75 and mem["sw_rag"]["quote_valid"] >= 0.75
    assert mem["sw_rag_no_oracle"]["quote_valid"] < mem["sw_rag"]["quote_valid"]   # its quotes are not there to copy


def test_a_declared_rag_set_can_be_sfts_target_and_a_gate_general_metric(tmp_path):
    from stagewise.config import load_config
    from stagewise.evalsets import plan

    src = tmp_path / "src" / "corpus.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(20)))
    (tmp_path / "rag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    p = tmp_path / "params.yaml"
    p.write_text(f"data:\n  sources:\n    docs: {{path: {src}, kind: corpus}}\n"
                 "evaluate:\n  sets:\n    mine: {path: rag.jsonl, kind: rag}\n"
                 "sft: {target: mine.token_f1}\n"
                 "gate: {general: [mine.token_f1_no_oracle, mine.quote_valid]}\n")
    pl = plan(load_config(p), tmp_path)
    assert pl.targets["sft"].label == "mine.token_f1"
    assert [(m.label, m.set, m.higher_is_better) for m in pl.general] == [
        ("mine_no_oracle.token_f1", "mine", True), ("mine.quote_valid", "mine", True)]
    assert pl.set_tasks("mine") == ["mine", "mine_no_oracle"]
    # beside the target, without repeating it
    assert [m.label for m in pl.context("sft")] == ["mine_no_oracle.token_f1", "mine.quote_valid"]
    # and the earlier stage's target (pretrain's held-out corpus: the rulebook keeps it)
    assert pl.stage_tasks("sft") == ["mine", "mine_no_oracle", "heldout_corpus"]
    # a bad row stops at config load with file:line
    (tmp_path / "rag.jsonl").write_text(json.dumps({**ROWS[0], "oracle": 3, "answer": "Nowhere"}) + "\n")
    with pytest.raises(Exception, match=r"rag.jsonl:1: evaluate.sets.mine: the answer 'Nowhere' does not occur"):
        load_config(p, root=tmp_path)


def test_sfts_reading_numbers_reach_its_row_the_summary_table_and_the_gate_report(tmp_path):
    from stagewise.evalsets import demo_plan
    from stagewise.report import write_gate_report
    from stagewise.stage import target_row
    from stagewise.summary import summary_table
    from test_report import make_summary

    child = {"sw_instruct": {"token_f1": 0.7}, "sw_rag": {"token_f1": 0.81, "quote_valid": 0.93},
             "sw_rag_no_oracle": {"token_f1": 0.12}}
    parent = {"sw_instruct": {"token_f1": 0.2}, "sw_rag": {"token_f1": 0.05, "quote_valid": 0.0},
              "sw_rag_no_oracle": {"token_f1": 0.04}}
    row = target_row("sft", child, parent, demo_plan(tmp_path))
    assert {k: (v["baseline"], v["value"]) for k, v in row["context"].items()} == {
        "sw_rag.token_f1": (0.05, 0.81), "sw_rag_no_oracle.token_f1": (0.04, 0.12), "sw_rag.quote_valid": (0.0, 0.93)}
    assert "context" not in target_row("pretrain", child, parent, demo_plan(tmp_path))

    summary = make_summary(True)
    summary["stages"][1]["context"] = row["context"]
    summary["curation"]["raft"] = {"enabled": True, "rows": 200, "oracle_share": 0.79, "distractors": 4,
                                   "refusals": 0, "quarantined": 1}
    summary["data"] = {}
    text = summary_table(summary)
    assert "sft also: sw_rag.token_f1 0.05 → 0.81, sw_rag_no_oracle.token_f1 0.04 → 0.12, sw_rag.quote_valid 0 → 0.93" in text
    assert "raft: 200 open-book rows, oracle share 0.79, 4 distractors, 0 refusals" in text
    md, html = write_gate_report(tmp_path / "r", summary)
    for page in (md.read_text(), html.read_text()):
        assert "sw_rag_no_oracle.token_f1" in page and "0.93" in page
        assert "Open-book chats (raft): 200 rows, oracle kept in 79%, 4 distractors each, 0 refusals, 1 records quarantined." in page
