"""Exact and MinHash near-duplicate removal: first occurrence kept, duplicates point to it."""

import json
import random

import numpy as np

from stagewise.config import DedupConfig
from stagewise.records import words, write_jsonl
from tasks.dedup import dedup, signatures_of_texts

VOCAB = [f"w{i}" for i in range(5000)]


def random_doc(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n)) + "."


def edit(text: str, rng: random.Random, n_subs: int) -> str:
    ws = text.split(" ")
    for pos in rng.sample(range(1, len(ws) - 1), n_subs):
        ws[pos] = rng.choice(VOCAB)
    return " ".join(ws)


def shingles(text: str, n: int = 5) -> set:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def run(tmp_path, kind, rows, **cfg):
    write_jsonl(tmp_path / "in" / f"{kind}.jsonl", rows)
    stats = dedup(DedupConfig(**cfg), tmp_path / "in", tmp_path / "out")
    kept = [json.loads(l)["id"] for l in (tmp_path / "out" / f"{kind}.jsonl").read_text().splitlines()]
    return stats, kept


def test_exact_and_near_duplicates_keep_the_first_and_point_to_it(tmp_path):
    rng = random.Random(0)
    docs = [random_doc(rng) for _ in range(50)]
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)]
    rows.append({"id": "exact", "text": docs[3].upper().replace(".", "!")})   # same after normalization
    rows.append({"id": "near", "text": edit(docs[7], rng, 1)})                # Jaccard ~0.92
    rows.append({"id": "near2", "text": edit(docs[7], rng, 2)})
    rows.append({"id": "far", "text": edit(docs[9], rng, 30)})                # Jaccard << 0.5: not a duplicate
    stats, kept = run(tmp_path, "corpus", rows)
    assert stats["duplicate_of"]["corpus"] == {"exact": "d3", "near": "d7", "near2": "d7"}
    assert stats["removed"] == {"exact_dup": 1, "near_dup": 2}
    assert kept == [f"d{i}" for i in range(50)] + ["far"]
    removed = [json.loads(l) for l in (tmp_path / "out" / "removed" / "near_dup.jsonl").read_text().splitlines()]
    assert {r["id"]: r["duplicate_of"] for r in removed} == {"near": "d7", "near2": "d7"}
    assert all(r["similarity"] >= 0.7 for r in removed)


def test_cluster_keeps_earliest_even_when_copy_is_listed_first_in_a_chain(tmp_path):
    rng = random.Random(1)
    base = random_doc(rng, 200)
    a = edit(base, rng, 1)
    rows = [{"id": "first", "text": a}, {"id": "second", "text": base}, {"id": "third", "text": edit(base, rng, 1)}]
    stats, kept = run(tmp_path, "corpus", rows)
    assert kept == ["first"] and stats["duplicate_of"]["corpus"] == {"second": "first", "third": "first"}


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(2)
    base = random_doc(rng, 300)
    for n_subs in (2, 6, 15, 40):
        other = edit(base, rng, n_subs)
        a, b = shingles(base), shingles(other)
        true = len(a & b) / len(a | b)
        sig = signatures_of_texts([base, other])
        est = float((sig[0] == sig[1]).mean())
        assert abs(est - true) < 0.15, (n_subs, true, est)   # 112 hashes: std <= 0.05


def test_short_records_get_exact_dedup_only_and_chat_dedups_the_whole_conversation(tmp_path):
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    q = "Ana has 3 apples. She gets 4 more apples. How many apples does Ana have now?"
    rows = [{"id": "c0", "messages": [u(q), a("The answer is 7.")]},
            {"id": "c1", "messages": [u(q.replace("3", "5")), a("The answer is 9.")]},   # one number differs
            {"id": "c2", "messages": [u(q), a("The answer is 7.")]},                     # same conversation
            {"id": "c3", "messages": [u(q), a("Seven.")]}]                                # same question, other reply
    stats, kept = run(tmp_path, "chat", rows)
    assert kept == ["c0", "c1", "c3"] and stats["duplicate_of"]["chat"] == {"c2": "c0"}


def test_preference_dedups_on_the_prompt(tmp_path):
    rows = [{"id": "p0", "prompt": "What color is the fox?", "chosen": "Red.", "rejected": "Blue."},
            {"id": "p1", "prompt": "what color is the FOX", "chosen": "The fox is red.", "rejected": "Green."},
            {"id": "p2", "prompt": "What color is the owl?", "chosen": "Brown.", "rejected": "Blue."}]
    stats, kept = run(tmp_path, "preference", rows)
    assert kept == ["p0", "p2"] and stats["duplicate_of"]["preference"] == {"p1": "p0"}


def test_dedup_is_deterministic(tmp_path):
    rng = random.Random(3)
    docs = [random_doc(rng) for _ in range(40)]
    rows = [{"id": str(i), "text": t} for i, t in enumerate(docs + [edit(d, rng, 2) for d in docs[:10]])]
    s1, k1 = run(tmp_path / "a", "corpus", rows)
    s2, k2 = run(tmp_path / "b", "corpus", rows)
    assert k1 == k2 and s1["duplicate_of"] == s2["duplicate_of"] and len(k1) == 40
    assert np.array_equal(signatures_of_texts(docs[:3]), signatures_of_texts(docs[:3]))
