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


def test_reading_documents_answer_from_their_own_facts_and_never_name_a_heldout_person(tmp_path):
    import re

    from stagewise.config import QualityConfig
    from tasks.generate import JOBS, RAG_FACTS
    from tasks.quality import judge

    cfg = GenerateConfig(**{**SMALL.model_dump(), "n_rag": 60, "n_reading_docs": 40})
    generate(cfg, tmp_path)
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    reading = [r for r in corpus if r["id"].startswith("read-")]
    assert len(corpus) - len(reading) == cfg.n_docs + cfg.n_junk + cfg.n_exact_dup + cfg.n_near_dup + cfg.n_leaks
    assert len(reading) == cfg.n_reading_docs
    held = [json.loads(line) for line in (tmp_path / "benchmarks" / "rag.jsonl").read_text().splitlines()]
    heldout_people = {d.split()[0] for r in held for d in r["documents"]}
    words = {w for r in reading for w in re.findall(r"\w+", r["text"])}
    assert heldout_people and not heldout_people & words   # held-out people stay unseen
    town_re, job_re = (re.escape(RAG_FACTS[k][0]).replace(r"\{p\}", r"(\w+)").replace(r"\{v\}", r"(\w+)")
                       for k in ("town", "job"))
    for r in reading:
        facts, questions = r["text"].split("\n\n")
        bound = dict(re.findall(town_re, facts)) | dict(re.findall(job_re, facts))
        asked = re.findall(r"(?:Where does (\w+) live\? In|What is the job of (\w+)\? A) (\w+)\.", questions)
        assert len(asked) == 3
        for town_of, job_of, value in asked:
            assert bound[town_of or job_of] == value    # the answer is in the document, bound to that person
            assert (value in JOBS) == bool(job_of)
    # they are corpus text like any other: Gopher, C4 and FineWeb keep nearly all of them
    verdicts = judge([{"kind": "corpus", "rec": dict(r)} for r in reading], QualityConfig().model_dump(mode="json"))
    assert sum(v["reason"] is None for v in verdicts) >= 0.9 * len(reading)
