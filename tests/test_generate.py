import json

from stagewise.config import GenerateConfig
from tasks.generate import generate

SMALL = GenerateConfig(n_docs=120, n_junk=6, n_exact_dup=4, n_near_dup=4, n_leaks=3, n_chat=80,
                       n_preference=60, n_verifiable=80, n_eval=20)


def test_generator_is_deterministic(tmp_path):
    generate(SMALL, tmp_path / "a")
    generate(SMALL, tmp_path / "b")
    for name in ("corpus", "chat", "preference", "verifiable", "manifest"):
        ext = "json" if name == "manifest" else "jsonl"
        assert (tmp_path / "a" / f"{name}.{ext}").read_bytes() == (tmp_path / "b" / f"{name}.{ext}").read_bytes()
    other = GenerateConfig(**{**SMALL.model_dump(), "seed": SMALL.seed + 1})
    generate(other, tmp_path / "c")
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() != (tmp_path / "c" / "corpus.jsonl").read_bytes()


def test_planted_defects_are_in_the_manifest_and_point_backwards(tmp_path):
    counts = generate(SMALL, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert counts["corpus"] == len(corpus) == SMALL.n_docs + SMALL.n_junk + SMALL.n_exact_dup + SMALL.n_near_dup + SMALL.n_leaks
    pos = {r["id"]: i for i, r in enumerate(corpus)}
    text = {r["id"]: r["text"] for r in corpus}
    m = manifest["corpus"]
    assert (len(m["junk"]), len(m["exact_dup"]), len(m["near_dup"]), len(m["leak"])) == (6, 4, 4, 3)
    for dup, orig in m["exact_dup"].items():
        assert text[dup] == text[orig] and pos[dup] > pos[orig]   # dedup keeps the first occurrence
    for dup, orig in m["near_dup"].items():
        assert text[dup] != text[orig] and pos[dup] > pos[orig]
    bench = {json.loads(l)["id"]: json.loads(l)["text"]
             for l in (tmp_path / "benchmarks" / "general_text.jsonl").read_text().splitlines()}
    for doc_id, ref in m["leak"].items():
        assert bench[ref.split(":", 1)[1]] in text[doc_id]            # verbatim leak of a benchmark item


def test_heldout_instructions_never_appear_in_training_chat(tmp_path):
    generate(SMALL, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    leaks = set(manifest["chat"]["leak"])
    questions = {json.loads(l)["question"] for l in (tmp_path / "benchmarks" / "instruct.jsonl").read_text().splitlines()}
    for line in (tmp_path / "chat.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["id"] not in leaks and rec["messages"]:
            assert rec["messages"][0]["content"] not in questions


def test_copy_documents_repeat_their_own_people_and_never_name_a_heldout_one(tmp_path):
    import re

    from stagewise.config import QualityConfig
    from tasks.quality import judge

    cfg = GenerateConfig(**{**SMALL.model_dump(), "n_rag": 60, "n_copy_docs": 40})
    generate(cfg, tmp_path)
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    docs = [r for r in corpus if r["id"].startswith("copy-")]
    assert len(docs) == cfg.n_copy_docs
    # the rest of the world is the one generated without them
    generate(SMALL.model_copy(update={"n_rag": 60}), tmp_path / "without")
    assert [r for r in corpus if not r["id"].startswith("copy-")] == [
        json.loads(line) for line in (tmp_path / "without" / "corpus.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "benchmarks" / "rag.jsonl").read_text().splitlines()]
    heldout_people = {d.split()[0] for r in held for d in r["documents"]}
    words = {w for r in docs for w in re.findall(r"\w+", r["text"])}
    assert heldout_people and not heldout_people & words   # held-out people stay unseen
    for r in docs:
        first, second = r["text"].split("\n\n")
        people = re.findall(r"(\w+) lives in (\w+)\.", first)
        assert len(people) == 3
        for name, town in people:
            assert name in second    # every person comes back: a later mention can only be copied
            assert re.search(rf"{name} works as a \w+\.", first)
            for told in re.findall(rf"{name}\W+(?:went back to|walked home to|live\? In|is a \w+ from) (\w+)", second):
                assert told == town  # and what is said again is what the document bound to them
    verdicts = judge([{"kind": "corpus", "rec": dict(r)} for r in docs], QualityConfig().model_dump(mode="json"))
    assert all(v["reason"] is None for v in verdicts)   # corpus text like any other: the filters keep it
