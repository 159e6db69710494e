"""raft — open-book training chats from rag records (Retrieval-Augmented Fine-Tuning, arXiv 2403.10131).

For every curated rag record: `raft.distractors` chunks drawn (seeded, per record) from the record's
own other documents and then the pool — every chunk of the curated corpus and of the other rag
records — never one that contains the answer; the oracle chunk kept with probability `raft.p_oracle`
(else one more distractor takes its place, so every row shows k+1 documents); the documents
shuffled. The reply quotes the oracle's supporting sentence verbatim between `##begin_quote##` and
`##end_quote##` and ends `<ANSWER>: …`; a row without the oracle answers from what the model was
taught (`<ANSWER>: …`), or, for a `raft.refusal_share` of them, says the documents do not say.

Inputs are curated (decontaminated against every eval set, rag documents included), so the rows are
too. A record that cannot be used (oracle index out of range, answer not in its oracle, too few
distractor chunks in the record and the pool) is quarantined — out_dir/quarantine/rag.jsonl with
file:line and reason — and counted; the run goes on. Writes out_dir/chat.jsonl (SFT reads it beside
the curated chats) and stats.json (rows, oracle share, distractors, refusals).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from stagewise.config import RaftConfig
from stagewise.rag import (
    RagProblem, check_rag, chunk, draw_distractors, oracle_chunk, oracle_passage, own_chunks, prompt, reply, seeded,
    supporting_quote)
from stagewise.records import BadInput, StepOutput, iter_jsonl, write_jsonl


def pool_chunks(corpus: list[str], records: list[dict], chunk_chars: int) -> list[str]:
    """Every distinct chunk of the corpus and of the rag records' documents, in a stable order."""
    out = [c for t in corpus for c in chunk(t, chunk_chars)]
    out += [c for r in records for c in own_chunks(r, chunk_chars)]
    return list(dict.fromkeys(out))


def raft_row(rec: dict, cfg: RaftConfig, pool: list[str]) -> dict:
    """One training chat from one rag record (raises RagProblem when it cannot be built)."""
    check_rag(rec)
    k, rng = cfg.distractors, seeded(cfg.seed, rec["id"])
    oracle = oracle_chunk(rec, cfg.chunk_chars)
    if oracle is None and oracle_passage(rec) is not None:
        # the answer spans two chunks: no single passage a retriever would return holds it
        raise RagProblem("answer_not_in_oracle", f"no chunk of the oracle (raft.chunk_chars={cfg.chunk_chars}) holds "
                         f"the whole answer {rec['answer']!r}", "raise raft.chunk_chars, or shorten the answer")
    keep = oracle is not None and rng.random() < cfg.p_oracle
    exclude = {oracle} if oracle is not None else set()
    need = k if keep else k + 1       # an absent oracle's place goes to one more distractor
    distractors = draw_distractors(rng, rec["answer"], exclude, own_chunks(rec, cfg.chunk_chars), pool, need)
    if len(distractors) < need:
        raise RagProblem("no_pool", f"{len(distractors)} distractor chunk(s) without the answer in the record and the "
                         f"pool, {need} needed (raft.distractors={k})",
                         "give the record more documents, curate a corpus to draw from, or lower raft.distractors")
    docs = distractors + ([oracle] if keep else [])
    rng.shuffle(docs)
    refuse = not keep and rng.random() < cfg.refusal_share
    quote = supporting_quote(oracle, rec["answer"]) if keep else None
    return {"id": f"raft-{rec['id']}",
            "messages": [{"role": "user", "content": prompt(rec["question"], docs)},
                         {"role": "assistant", "content": reply(rec["answer"], quote, refuse)}],
            "raft": {"source_id": rec["id"], "documents": docs, "oracle": docs.index(oracle) if keep else None,
                     "oracle_text": oracle, "quote": quote, "refusal": refuse}}


def raft(cfg: RaftConfig, in_dir: Path, out_dir: Path, root: Path | None = None) -> dict:
    """Build out_dir/chat.jsonl from in_dir/rag.jsonl (+ in_dir/corpus.jsonl as the pool); quarantine the rest."""
    if cfg.generator is not None:
        raise BadInput("params.yaml", None, f"raft.generator: {cfg.generator!r}: writing replies with a local model "
                       "is not built yet", "set raft.generator: null (offline replies from the record's answer "
                       "and the oracle's sentence)", code="bad_config")
    in_dir, out = Path(in_dir), StepOutput("raft", out_dir)
    src = in_dir / "rag.jsonl"
    shown = _shown(src, root)
    if not cfg.enabled or not src.exists():
        return out.finish(enabled=cfg.enabled, rows=0, oracle_rows=0, oracle_share=None,
                          distractors=cfg.distractors, refusals=0, quarantined={})
    records = [(i, r) for i, r in enumerate(_lines(src), 1)]
    corpus = [r["text"] for r in iter_jsonl(in_dir / "corpus.jsonl")] if (in_dir / "corpus.jsonl").exists() else []
    pool = pool_chunks(corpus, [r for _, r in records if _usable(r)], cfg.chunk_chars)
    rows, quarantine = [], []
    for line, rec in records:
        out.input["rag"] += 1
        try:
            rows.append(raft_row(rec, cfg, pool))
        except RagProblem as p:
            quarantine.append({"file": shown, "line": line, "id": rec.get("id"), "reason": p.code,
                               "problem": p.problem, "fix": p.fix, "record": rec})
            out.remove("rag", rec, p.code, file=shown, line=line, problem=p.problem)
    out.keep("chat", rows)
    if quarantine:
        write_jsonl(out.out_dir / "quarantine" / "rag.jsonl", quarantine)
    with_oracle = sum(r["raft"]["oracle"] is not None for r in rows)
    return out.finish(enabled=True, rows=len(rows), oracle_rows=with_oracle,
                      oracle_share=round(with_oracle / len(rows), 4) if rows else None,
                      distractors=cfg.distractors, p_oracle=cfg.p_oracle, pool_chunks=len(pool),
                      refusals=sum(r["raft"]["refusal"] for r in rows),
                      quarantined={"rag": len(quarantine)} if quarantine else {})


def _lines(path: Path):
    return iter_jsonl(path, ["id", "question", "answer"])


def _usable(rec: dict) -> bool:
    try:
        check_rag(rec)
        return True
    except RagProblem:
        return False


def _shown(f: Path, root: Path | None) -> str:
    # relative to the workspace: stats.json and the quarantine are DVC outputs, the same in any clone
    try:
        return Path(f).resolve().relative_to(Path(root).resolve()).as_posix() if root else str(f)
    except ValueError:
        return str(f)


@task(name="raft", retries=1)
def raft_task(cfg: RaftConfig, in_dir: Path, out_dir: Path, root: Path | None = None) -> dict:
    """Open-book chats (oracle among distractors, or distractors only) from the curated rag records."""
    return raft(cfg, in_dir, out_dir, root)
