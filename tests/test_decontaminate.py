"""Benchmark decontamination: 13-gram hits in documents, 8-gram coverage in prompts, excision."""

import json

from stagewise.config import DecontaminateConfig
from stagewise.records import write_jsonl
from tasks.decontaminate import decontaminate

BENCH_TEXT = ("On a cold day Ana walked to the narrow bridge at the edge of town and then Ben and Mia "
              "looked at a quiet garden behind the school")
FILLER = " ".join(f"word{i}" for i in range(300))


def setup(tmp_path, kind, rows):
    write_jsonl(tmp_path / "in" / f"{kind}.jsonl", rows)
    bench = tmp_path / "bench"
    write_jsonl(bench / "general_text.jsonl", [{"id": "gt-1", "text": BENCH_TEXT}])
    write_jsonl(bench / "arithmetic.jsonl", [
        {"id": "ar-1", "question": "Kai had 4 kites and gave 2 to a friend. How many kites does Kai have left?", "answer": "2"}])
    write_jsonl(bench / "instruct.jsonl", [{"id": "ins-1", "question": "What color is the fox?", "answer": "The fox is red."}])
    return bench


def run(tmp_path, kind, rows, **cfg):
    bench = setup(tmp_path, kind, rows)
    stats = decontaminate(DecontaminateConfig(**cfg), tmp_path / "in", bench, tmp_path / "out")
    kept = [json.loads(l) for l in (tmp_path / "out" / f"{kind}.jsonl").read_text().splitlines()]
    return stats, kept


def test_documents_sharing_a_13_gram_are_removed_and_name_the_item(tmp_path):
    w = BENCH_TEXT.split()
    rows = [{"id": "leak", "text": FILLER + " " + " ".join(w[3:16]).upper() + "! " + FILLER},   # 13 words, case changed
            {"id": "near", "text": FILLER + " " + " ".join(w[3:15]) + " " + FILLER},            # 12 words: not a hit
            {"id": "clean", "text": FILLER}]
    stats, kept = run(tmp_path, "corpus", rows)
    assert stats["contaminated"]["corpus"] == {"leak": "general_text:gt-1"}
    assert [r["id"] for r in kept] == ["near", "clean"]
    [row] = [json.loads(l) for l in (tmp_path / "out" / "removed" / "contaminated.jsonl").read_text().splitlines()]
    assert row["matched"] == "general_text:gt-1" and row["record"]["id"] == "leak"


def test_prompts_by_8_gram_coverage_and_contained_short_questions(tmp_path):
    rows = [
        {"id": "copy", "prompt": "Kai had 4 kites and gave 2 to a friend. How many kites does Kai have left?", "answer": "2"},
        # two slots changed: 3 of 10 8-grams shared -> coverage 0.3 < 0.5
        {"id": "sibling", "prompt": "Kai had 6 kites and gave 3 to a friend. How many kites does Kai have left?", "answer": "3"},
        {"id": "contains", "prompt": "Quick question: what color is the fox?", "answer": "0"},
        {"id": "other", "prompt": "What color is the owl?", "answer": "0"},
    ]
    stats, kept = run(tmp_path, "verifiable", rows)
    assert stats["contaminated"]["verifiable"] == {"copy": "arithmetic:ar-1", "contains": "instruct:ins-1"}
    assert [r["id"] for r in kept] == ["sibling", "other"]
    stats, _ = run(tmp_path / "strict", "verifiable", rows, short_coverage=0.25)
    assert "sibling" in stats["contaminated"]["verifiable"]            # the threshold is what decides


def test_chat_checks_every_user_turn(tmp_path):
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    rows = [{"id": "c0", "messages": [u("Hello there, how are you?"), a("Fine."), u("What color is the fox?"), a("Red.")]},
            {"id": "c1", "messages": [u("Hello there, how are you?"), a("Fine.")]}]
    stats, kept = run(tmp_path, "chat", rows)
    assert stats["contaminated"]["chat"] == {"c0": "instruct:ins-1"} and [r["id"] for r in kept] == ["c1"]


def test_excise_mode_cuts_the_leaked_span_and_keeps_the_rest(tmp_path):
    before = " ".join(f"alpha{i}" for i in range(200))
    after = " ".join(f"omega{i}" for i in range(200))
    rows = [{"id": "leak", "text": f"{before} {BENCH_TEXT} {after}"}]
    stats, kept = run(tmp_path, "corpus", rows, mode="excise", excise_window_chars=20, excise_min_chars=100)
    assert stats["removed"] == {} and stats["excised"]["corpus"] == {"leak": ["general_text:gt-1"]}
    text = kept[0]["text"]
    assert "narrow bridge" not in text and "alpha0 " in text and text.endswith("omega199")
    # too dirty: more matched regions than allowed -> dropped, still named
    stats, kept = run(tmp_path / "dirty", "corpus", [{"id": "leak", "text": f"{before} {BENCH_TEXT} {after} {BENCH_TEXT} {before}"}], mode="excise", excise_max_matches=1)
    assert stats["contaminated"]["corpus"] == {"leak": "general_text:gt-1"} and kept == []
