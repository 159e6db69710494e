"""The raft step: open-book chats from rag records — bad records quarantined, the rows' shape on the
demo world's curated data (oracle share, k+1 documents, no oracle where absent, verbatim quotes), and
determinism."""

import json
import math
from pathlib import Path

import pytest

from stagewise.config import DataConfig, IngestConfig, RaftConfig, load_config
from stagewise.rag import ANSWER, BEGIN, END, REFUSAL, contains_answer, quotes
from stagewise.records import BadInput
from tasks.ingest import ingest
from tasks.raft import raft

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


FILLER = [f"The {c} tower in town {i} has {i + 3} windows. It was built in spring." for i, c in
          enumerate(["old", "red", "tall", "new", "small", "round", "wooden", "narrow"])]
GOOD = {"id": "good", "question": "Where does Zorbin live?", "answer": "Quellport",
        "documents": ["Zorbin lives in Quellport. Zorbin is a painter.", *FILLER[:5]], "oracle": 0}


@pytest.mark.parametrize("bad, reason", [
    ({"id": "b1", "question": "Where does Zorbin live?", "answer": "Quellport",
      "documents": ["Zorbin lives in Quellport.", "A filler passage."], "oracle": 5}, "oracle_out_of_range"),
    ({"id": "b2", "question": "Where does Zorbin live?", "answer": "Marrow",
      "documents": ["Zorbin lives in Quellport.", "A filler passage."], "oracle": 0}, "answer_not_in_oracle"),
    ({"id": "b3", "question": "Where does Zorbin live?", "answer": "Marrow",
      "oracle_text": "Zorbin lives in Quellport."}, "answer_not_in_oracle"),
], ids=["oracle_out_of_range", "answer_not_in_documents_oracle", "answer_not_in_oracle_text"])
def test_a_bad_record_is_quarantined_with_file_line_and_reason_and_the_run_goes_on(tmp_path, bad, reason):
    curated = tmp_path / "data" / "05_curated"
    write(curated / "rag.jsonl", [GOOD, bad, {**GOOD, "id": "good2"}])
    stats = raft(RaftConfig(), curated, tmp_path / "data" / "05_raft", root=tmp_path)
    q = lines(tmp_path / "data" / "05_raft" / "quarantine" / "rag.jsonl")
    assert [(r["file"], r["line"], r["id"], r["reason"]) for r in q] == [("data/05_curated/rag.jsonl", 2, bad["id"], reason)]
    assert q[0]["problem"] and q[0]["fix"]
    assert stats["removed"] == {reason: 1} and stats["quarantined"] == {"rag": 1}
    assert stats["rows"] == 2 == len(lines(tmp_path / "data" / "05_raft" / "chat.jsonl"))


def test_no_documents_and_no_pool_is_quarantined_as_no_pool(tmp_path):
    # oracle_text only, no corpus and no other record: nothing to draw distractors from
    curated = tmp_path / "c"
    write(curated / "rag.jsonl", [{"id": "lonely", "question": "Where does Zorbin live?", "answer": "Quellport",
                                   "oracle_text": "Zorbin lives in Quellport."}])
    stats = raft(RaftConfig(), curated, tmp_path / "out")
    q = lines(tmp_path / "out" / "quarantine" / "rag.jsonl")
    assert [(r["line"], r["reason"]) for r in q] == [(1, "no_pool")]
    assert stats["rows"] == 0 and stats["removed"] == {"no_pool": 1}
    assert lines(tmp_path / "out" / "chat.jsonl") == []
    # the same record with a corpus to draw from is fine
    write(curated / "corpus.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(FILLER)])
    assert raft(RaftConfig(), curated, tmp_path / "out")["rows"] == 1


def test_a_record_of_the_wrong_shape_is_quarantined_at_ingest_with_its_line(tmp_path):
    src = write(tmp_path / "raw" / "rag.jsonl", [GOOD, {"question": "Q?", "answer": "A", "documents": "not a list"},
                                                 {"question": "Q?", "answer": "A"}])
    stats = ingest(DataConfig(sources={"r": {"path": str(src), "kind": "rag"}}, on_bad_rows="quarantine"),
                   IngestConfig(), tmp_path / "raw", tmp_path / "02")
    q = lines(tmp_path / "02" / "quarantine" / "rag.jsonl")
    assert [(r["line"], r["reason"]) for r in q] == [(2, "wrong_type"), (3, "missing_field")]
    assert stats["kept"] == {"rag": 1}
    with pytest.raises(BadInput, match=r"rag.jsonl:2: field 'documents' must be a list"):
        ingest(DataConfig(sources={"r": {"path": str(src), "kind": "rag"}}), IngestConfig(), tmp_path / "raw", tmp_path / "03")


def test_refusal_share_and_disabled_and_a_generator_that_does_not_exist_yet(tmp_path):
    curated = tmp_path / "c"
    write(curated / "rag.jsonl", [{**GOOD, "id": f"r{i}"} for i in range(40)])
    stats = raft(RaftConfig(p_oracle=0.0, refusal_share=1.0), curated, tmp_path / "o1")
    rows = lines(tmp_path / "o1" / "chat.jsonl")
    assert stats["refusals"] == 40 and all(r["messages"][1]["content"] == f"{ANSWER} {REFUSAL}" for r in rows)
    stats = raft(RaftConfig(p_oracle=0.0, refusal_share=0.0), curated, tmp_path / "o1")
    assert stats["refusals"] == 0
    assert {r["messages"][1]["content"] for r in lines(tmp_path / "o1" / "chat.jsonl")} == {f"{ANSWER} Quellport"}
    stats = raft(RaftConfig(enabled=False), curated, tmp_path / "o1")
    assert stats["rows"] == 0 and not (tmp_path / "o1" / "chat.jsonl").exists()   # a disabled run leaves nothing stale
    with pytest.raises(BadInput, match="raft.generator"):
        raft(RaftConfig(generator="models/writer"), curated, tmp_path / "o2")


# ---------------------------------------------------------------- the step's real output on the demo world
@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    """The smoke profile's world, curated by the real steps, then raft: (config, rows, stats, curated rag)."""
    from tasks.decontaminate import decontaminate
    from tasks.dedup import dedup
    from tasks.generate import generate
    from tasks.quality import quality

    tmp = tmp_path_factory.mktemp("raftworld")
    # the smoke profile switches the step off for the pipeline's sake (its chats double SFT): on here
    cfg = load_config(REPO / "params.yaml", profile="smoke", overrides=["raft.enabled=true"])
    raw = tmp / "01_raw"
    generate(cfg.generate, raw)
    ingest(cfg.data, cfg.ingest, raw, tmp / "02")
    quality(cfg.quality, tmp / "02", tmp / "03")
    dedup(cfg.dedup, tmp / "03", tmp / "04")
    decontaminate(cfg.decontaminate, tmp / "04", raw / "benchmarks", tmp / "05")
    stats = raft(cfg.raft, tmp / "05", tmp / "raft")
    return cfg, tmp, lines(tmp / "raft" / "chat.jsonl"), stats, {r["id"]: r for r in lines(tmp / "05" / "rag.jsonl")}


def test_every_curated_rag_record_becomes_one_row(demo_rows):
    cfg, _, rows, stats, curated = demo_rows
    assert len(curated) == cfg.generate.n_rag          # curation keeps the demo's clean rag records
    assert stats["rows"] == len(rows) == len(curated) and stats["removed"] == {}
    assert sorted(r["raft"]["source_id"] for r in rows) == sorted(curated)


def test_the_oracle_share_is_within_the_binomial_95_interval_of_p_oracle(demo_rows):
    cfg, _, rows, stats, _ = demo_rows
    n, p = len(rows), cfg.raft.p_oracle
    share = sum(r["raft"]["oracle"] is not None for r in rows) / n
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert p - half <= share <= p + half, (share, p, half)
    assert stats["oracle_share"] == round(share, 4)


def test_every_row_shows_k_plus_1_distinct_documents_the_oracle_among_them_when_kept(demo_rows):
    cfg, _, rows, _, curated = demo_rows
    k = cfg.raft.distractors
    for r in rows:
        docs, rec = r["raft"]["documents"], curated[r["raft"]["source_id"]]
        assert len(docs) == len(set(docs)) == k + 1
        assert r["messages"][0]["content"].split("\n")[1:-1] == docs      # one per line, in this order
        distractors = [d for i, d in enumerate(docs) if i != r["raft"]["oracle"]]
        assert not any(contains_answer(d, rec["answer"]) for d in distractors)   # never a chunk with the answer
        if r["raft"]["oracle"] is not None:
            assert docs[r["raft"]["oracle"]] == rec["documents"][rec["oracle"]]


def test_oracle_absent_rows_hold_no_oracle_text_and_no_quote(demo_rows):
    _, _, rows, _, curated = demo_rows
    absent = [r for r in rows if r["raft"]["oracle"] is None]
    assert absent
    for r in absent:
        rec = curated[r["raft"]["source_id"]]
        oracle = rec["documents"][rec["oracle"]]
        assert oracle not in r["messages"][0]["content"] and rec["answer"] not in r["messages"][0]["content"]
        assert BEGIN not in r["messages"][1]["content"]
        assert r["messages"][1]["content"] == f"{ANSWER} {rec['answer']}"


def test_every_quote_is_verbatim_in_the_oracle_and_the_reply_ends_with_the_answer(demo_rows):
    _, _, rows, _, curated = demo_rows
    for r in rows:
        if r["raft"]["oracle"] is None:
            continue
        rec, reply = curated[r["raft"]["source_id"]], r["messages"][1]["content"]
        oracle = r["raft"]["documents"][r["raft"]["oracle"]]
        qs = quotes(reply)
        assert qs and all(q in oracle for q in qs) and contains_answer(qs[0], rec["answer"])
        assert reply.count(BEGIN) == reply.count(END) == 1
        assert reply.endswith(f"{ANSWER} {rec['answer']}")


def test_same_inputs_same_rows_and_same_dvc_hash(demo_rows):
    from stagewise.hashing import dir_hash

    cfg, tmp, _, stats, _ = demo_rows
    again = raft(cfg.raft, tmp / "05", tmp / "raft2")
    assert again == stats
    assert (tmp / "raft" / "chat.jsonl").read_bytes() == (tmp / "raft2" / "chat.jsonl").read_bytes()
    assert dir_hash(tmp / "raft") == dir_hash(tmp / "raft2")
    other = raft(cfg.raft.model_copy(update={"seed": cfg.raft.seed + 1}), tmp / "05", tmp / "raft3")
    assert (tmp / "raft" / "chat.jsonl").read_bytes() != (tmp / "raft3" / "chat.jsonl").read_bytes()
    assert other["rows"] == stats["rows"]


def test_the_training_data_hash_joins_the_raft_output_to_the_curated_data():
    from stagewise.hashing import training_data_hash

    assert training_data_hash({"decontaminate": "a.dir"}) == "a.dir"
    assert training_data_hash({"decontaminate": "a.dir", "raft": "b.dir"}) == "a.dir+b.dir"
    assert training_data_hash({"decontaminate": "a.dir", "raft": "c.dir"}) != "a.dir+b.dir"   # SFT's key moves
