"""Quality filters: each rule family fires for its reason, thresholds are configurable, null disables."""

import json
from pathlib import Path

from stagewise.config import QualityConfig
from stagewise.records import write_jsonl
from tasks.quality import quality, roles_in_order

GOOD = ("Ana walked to the old bridge near the river in the morning. The fox lives in the forest and eats "
        "berries. Ben and Mia painted a small boat by the old mill. The owl is brown and sleeps in the cave. "
        "In the evening, Tom looked at the tall tower across the square. The bear likes to eat fish from the "
        "lake. Everyone knows that the wolf is gray.")


def run(tmp_path: Path, kind: str, rows: list[dict], **cfg) -> tuple[dict, dict[str, str], list[dict]]:
    write_jsonl(tmp_path / "in" / f"{kind}.jsonl", rows)
    stats = quality(QualityConfig(**cfg), tmp_path / "in", tmp_path / "out")
    reasons = {}
    for f in (tmp_path / "out" / "removed").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            assert r["reason"] == f.stem and r["record"]["id"] == r["id"]
            reasons[r["id"]] = r["reason"]
    kept = [json.loads(l) for l in (tmp_path / "out" / f"{kind}.jsonl").read_text().splitlines()]
    return stats, reasons, kept


def test_each_corpus_rule_family_removes_for_its_reason(tmp_path):
    docs = {
        "good": GOOD,
        "short": "Click here to buy things now.",
        "hashes": " ".join(f"#tag word{i} ##" for i in range(60)),
        "digits": " ".join(f"{100000 + 7 * i}-{500 + i}" for i in range(60)),
        "no_stop": " ".join(["red", "tall", "bridge", "green", "market", "quiet"] * 10) + ".",
        "repeated": "\n".join([GOOD.split(". ")[0] + ". The boat of the man was red and tall."] * 20),
        "lorem": GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "curly": GOOD + "\nThe function body is { return x; } and that is it.",
        # real words, but no line ends a sentence: C4 keeps no line, so fewer than 5 sentences
        "fragments": "\n".join(" ".join(GOOD.split()[i:i + 8]).rstrip(".") for i in range(0, 64, 8)),
    }
    stats, reasons, kept = run(tmp_path, "corpus", [{"id": k, "text": v} for k, v in docs.items()])
    assert reasons == {"short": "gopher_short_doc", "hashes": "gopher_too_many_hashes",
                       "digits": "gopher_below_alpha_threshold", "no_stop": "gopher_enough_stop_words",
                       "repeated": "gopher_rep_dup_line_frac", "lorem": "c4_lorem_ipsum",
                       "curly": "c4_curly_bracket", "fragments": "c4_too_few_sentences"}
    assert [r["id"] for r in kept] == ["good"] and kept[0]["text"] == GOOD     # untouched
    assert stats["input"] == {"corpus": 9} and stats["kept"] == {"corpus": 1} and sum(stats["removed"].values()) == 8


def test_thresholds_are_configurable_and_null_disables(tmp_path):
    rows = [{"id": "g", "text": GOOD}]                      # 69 words
    _, reasons, _ = run(tmp_path / "a", "corpus", rows, gopher_min_words=100)
    assert reasons == {"g": "gopher_short_doc"}
    _, reasons, _ = run(tmp_path / "b", "corpus", rows, gopher_min_words=60)
    assert reasons == {}
    _, reasons, _ = run(tmp_path / "c", "corpus", rows, c4_min_sentences=8)
    assert reasons == {"g": "c4_too_few_sentences"}
    _, reasons, _ = run(tmp_path / "d", "corpus", rows, gopher_min_words=None, c4_min_sentences=None)
    assert reasons == {}
    # a null Gopher repetition n-gram threshold switches that one n-gram rule off
    rep = {"id": "r", "text": GOOD + " " + " ".join(["the old bridge near the river"] * 3) + "."}
    _, reasons, _ = run(tmp_path / "e", "corpus", [rep])
    assert reasons["r"].startswith("gopher_rep_")
    off = {n: None for n in range(2, 11)}
    _, reasons, _ = run(tmp_path / "f", "corpus", [rep], gopher_max_top_ngram_char_frac=off,
                        gopher_max_dup_ngram_char_frac=off)
    assert reasons == {}


def test_fineweb_rules_and_c4_line_edits(tmp_path):
    w = ["apple", "river", "stone", "cloud", "garden", "window", "silver", "forest", "candle", "meadow", "harbor",
         "basket", "pencil", "mirror", "ladder", "button", "jacket", "rocket", "tunnel", "violin", "marble", "copper"]
    lines = [f"{w[i]} and {w[i + 1]} beside a {w[i + 2]}" for i in range(0, 20, 2)]   # no terminal punctuation
    docs = [{"id": "list", "text": GOOD + "\n" + "\n".join(lines)},
            {"id": "js", "text": GOOD + "\nPlease enable JavaScript to view the comments."}]
    # C4 would drop the unpunctuated lines itself; without it, FineWeb's punctuated-line ratio fires
    stats, reasons, kept = run(tmp_path, "corpus", docs, c4_terminal_punct_lines=False)
    assert reasons == {"list": "fineweb_line_punct_ratio"}
    assert kept[0]["text"] == GOOD and stats["edited"] == {"c4_lines_removed": 1}   # the JavaScript line went


def test_chat_preference_and_verifiable_rules(tmp_path):
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    chats = {"ok": [u("Hi?"), a("Hello.")], "sys": [{"role": "system", "content": "Be brief."}, u("Hi?"), a("Hello.")],
             "reversed": [a("Hello."), u("Hi?")], "no_reply": [u("Hi?")], "empty": [u("Hi?"), a("  ")],
             "truncated": [u("Tell me a story."), a("Once upon a time there was a")], "empty_q": [u(""), a("Fine.")]}
    _, reasons, kept = run(tmp_path / "c", "chat", [{"id": k, "messages": v} for k, v in chats.items()])
    assert reasons == {"reversed": "chat_role_order", "no_reply": "chat_no_response", "empty": "chat_empty_response",
                       "truncated": "chat_truncated", "empty_q": "chat_empty_prompt"}
    assert [r["id"] for r in kept] == ["ok", "sys"]
    _, reasons, _ = run(tmp_path / "c2", "chat", [{"id": "t", "messages": chats["truncated"]}], chat_truncated_endings=None)
    assert reasons == {}

    prefs = [{"id": "ok", "prompt": "Q?", "chosen": "A.", "rejected": "B."},
             {"id": "same", "prompt": "Q?", "chosen": "A.", "rejected": " A. "},
             {"id": "blank", "prompt": " ", "chosen": "A.", "rejected": "B."}]
    _, reasons, _ = run(tmp_path / "p", "preference", prefs)
    assert reasons == {"same": "pref_chosen_equals_rejected", "blank": "pref_empty_field"}

    ver = [{"id": "ok", "prompt": "2+2?", "answer": "4"}, {"id": "neg", "prompt": "1-3?", "answer": "-2"},
           {"id": "words", "prompt": "2+2?", "answer": "four"}]
    _, reasons, _ = run(tmp_path / "v", "verifiable", ver)
    assert reasons == {"words": "verifiable_answer_unparseable"}


def test_role_order():
    assert roles_in_order(["user", "assistant", "user", "assistant"])
    assert roles_in_order(["system", "user", "assistant", "tool", "assistant"])
    assert not roles_in_order(["user", "user", "assistant"])
    assert not roles_in_order(["user", "assistant", "user"])
    assert not roles_in_order([])
