"""Open-book records (kind `rag`): chunking, answer matching, the RAFT reply format, and its scores.

A rag record is `{question, answer, documents: [...], oracle: index | null}` or
`{question, answer, oracle_text}` (distractors then come from a pool: the corpus and the other
records' documents). Shared by the `raft` data step (training chats), the `rag` evaluation kind
(stagewise/evalsets.py) and the ingest schema check (stagewise/records.py). Pure functions only.

The reply format is Gorilla RAFT's: the supporting sentence quoted verbatim between
`##begin_quote##` and `##end_quote##`, then `<ANSWER>: …`.
"""

from __future__ import annotations

import random
import re
from typing import Any, Iterable

BEGIN, END, ANSWER = "##begin_quote##", "##end_quote##", "<ANSWER>:"
QUOTE_RE = re.compile(re.escape(BEGIN) + r"(.*?)" + re.escape(END), re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w+")
REFUSAL = "The documents do not say."
DEMO_DISTRACTORS = 4   # the eval kind's k: "the oracle among 4 distractors" (Meta's recipe, RAFT's default here)


class RagProblem(ValueError):
    """Why a rag record cannot be used: a reason code, the problem, and the fix."""

    def __init__(self, code: str, problem: str, fix: str):
        super().__init__(problem)
        self.code, self.problem, self.fix = code, problem, fix


# ---------------------------------------------------------------- text
def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def contains_answer(text: str, answer: str) -> bool:
    """The answer's words appear contiguously in the text (case and punctuation ignored): '7' is not in '17'."""
    a = _norm(answer)
    return bool(a) and f" {a} " in f" {_norm(text)} "


def sentences(text: str) -> list[str]:
    """Sentences (split after . ! ? and whitespace), whitespace collapsed: a chunk is one line of the
    prompt, and a quote is verbatim in the chunk shown."""
    return [" ".join(p.split()) for p in _SENTENCE_END.split(text.strip()) if p.strip()]


def chunk(text: str, chunk_chars: int) -> list[str]:
    """Sentences packed greedily into chunks of at most chunk_chars (a longer sentence stays whole, so a
    quote is never cut): how a retriever over sentence-split chunks would hand the document back."""
    out: list[str] = []
    cur = ""
    for s in sentences(text):
        if cur and len(cur) + 1 + len(s) > chunk_chars:
            out.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    if cur:
        out.append(cur)
    return out


def supporting_quote(oracle: str, answer: str) -> str:
    """The shortest run of consecutive sentences of the oracle that contains the answer (verbatim)."""
    ss = sentences(oracle)
    for n in range(1, len(ss) + 1):
        for i in range(len(ss) - n + 1):
            q = " ".join(ss[i:i + n])
            if contains_answer(q, answer):
                return q
    return oracle.strip()


# ---------------------------------------------------------------- records
def check_rag(rec: dict) -> None:
    """Raise RagProblem when a rag record cannot give an oracle (or a documents list) to read from.

    Codes: wrong_type, missing_field, oracle_out_of_range, answer_not_in_oracle."""
    for f in ("question", "answer"):
        if not isinstance(rec.get(f), str) or not rec[f].strip():
            raise RagProblem("missing_field" if rec.get(f) is None else "wrong_type",
                             f"field '{f}' must be a non-empty string", f"give every rag record a '{f}' string")
    docs, text = rec.get("documents"), rec.get("oracle_text")
    if docs is None and text is None:
        raise RagProblem("missing_field", "a rag record needs 'documents' (with 'oracle') or 'oracle_text'",
                         'e.g. {"question": "...", "answer": "...", "documents": ["...", "..."], "oracle": 0}')
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise RagProblem("wrong_type", "field 'oracle_text' must be a non-empty string",
                             "store the oracle passage as a string")
        if not contains_answer(text, rec["answer"]):
            raise RagProblem("answer_not_in_oracle", f"the answer {rec['answer']!r} does not occur in oracle_text",
                             "the oracle must contain the answer's words (fix the answer or the passage)")
    if docs is not None:
        if not isinstance(docs, list) or not all(isinstance(d, str) and d.strip() for d in docs):
            raise RagProblem("wrong_type", "field 'documents' must be a list of non-empty strings",
                             "store each document as a string")
        oracle = rec.get("oracle")
        if oracle is None:
            return
        if isinstance(oracle, bool) or not isinstance(oracle, int):
            raise RagProblem("wrong_type", f"field 'oracle' must be an index into documents or null, got {oracle!r}",
                             "give the 0-based position of the document that holds the answer, or null")
        if not 0 <= oracle < len(docs):
            raise RagProblem("oracle_out_of_range", f"oracle index {oracle} is outside documents (0..{len(docs) - 1})",
                             "give the 0-based position of the document that holds the answer, or null")
        if not contains_answer(docs[oracle], rec["answer"]):
            raise RagProblem("answer_not_in_oracle",
                             f"the answer {rec['answer']!r} does not occur in documents[{oracle}]",
                             "point 'oracle' at the document that holds the answer, or fix the answer")


def oracle_passage(rec: dict) -> str | None:
    """The record's oracle document (None: the record has none, every document is a distractor)."""
    if rec.get("oracle_text") is not None:
        return rec["oracle_text"]
    if rec.get("oracle") is not None:
        return rec["documents"][rec["oracle"]]
    return None


def oracle_chunk(rec: dict, chunk_chars: int) -> str | None:
    """The chunk of the oracle that holds the answer (the first one)."""
    passage = oracle_passage(rec)
    if passage is None:
        return None
    return next((c for c in chunk(passage, chunk_chars) if contains_answer(c, rec["answer"])), None)


def own_chunks(rec: dict, chunk_chars: int) -> list[str]:
    """Every chunk of the record's own documents and oracle text (distractor candidates once filtered)."""
    texts = list(rec.get("documents") or []) + ([rec["oracle_text"]] if rec.get("oracle_text") else [])
    return [c for t in texts for c in chunk(t, chunk_chars)]


def draw_distractors(rng: random.Random, answer: str, exclude: set[str], own: list[str], pool: list[str],
                     k: int) -> list[str]:
    """k distinct chunks, the record's own non-oracle chunks first (shuffled), then the pool; never one
    that contains the answer or is in `exclude`. Fewer than k when the candidates run out."""
    picked: list[str] = []
    seen = set(exclude)

    def ok(c: str) -> bool:
        return c not in seen and not contains_answer(c, answer)

    own = [c for c in dict.fromkeys(own) if ok(c)]
    rng.shuffle(own)
    for c in own[:k]:
        picked.append(c)
        seen.add(c)
    # the pool: random probes first (cheap on a large pool), then a full scan so a small pool is not missed
    tries = 0
    while len(picked) < k and pool and tries < 20 * k:
        c = pool[rng.randrange(len(pool))]
        tries += 1
        if ok(c):
            picked.append(c)
            seen.add(c)
    if len(picked) < k:
        rest = [c for c in dict.fromkeys(pool) if ok(c)]
        rng.shuffle(rest)
        picked += rest[: k - len(picked)]
    return picked


# ---------------------------------------------------------------- prompt and reply
def prompt(question: str, documents: list[str]) -> str:
    """The user turn: the documents, one per line, then the question (one format for training and
    evaluation; unnumbered: at the demo's sizes the numbers would push the reply past sft.max_length)."""
    docs = "\n".join(documents)   # chunks: whitespace already collapsed (sentences())
    return f"Documents:\n{docs}\nQuestion: {question}"


def reply(answer: str, quote: str | None, refuse: bool = False) -> str:
    """The target reply, one line: the quote (when the oracle was given), then `<ANSWER>: …`."""
    if refuse:
        return f"{ANSWER} {REFUSAL}"
    if quote is None:
        return f"{ANSWER} {answer}"
    return f"{BEGIN}{quote}{END} {ANSWER} {answer}"


def answer_part(text: str) -> str:
    """What follows the last `<ANSWER>:` (the whole reply when the marker is missing)."""
    i = text.rfind(ANSWER)
    return (text[i + len(ANSWER):] if i >= 0 else text).strip()


def quotes(text: str) -> list[str]:
    return [q.strip() for q in QUOTE_RE.findall(text)]


def quote_valid(text: str, documents: Iterable[str]) -> float:
    """1.0 when the reply quotes at least once and every quote is a verbatim substring of a given document."""
    qs, docs = quotes(text), list(documents)
    return float(bool(qs) and all(q and any(q in d for d in docs) for q in qs))


def seeded(seed: Any, rid: str) -> random.Random:
    """A record's own generator: its draws do not depend on the other records or their order."""
    return random.Random(f"{seed}:{rid}")


# ---------------------------------------------------------------- evaluation items (the `rag` eval kind)
EVAL_DISTRACTORS, EVAL_CHUNK_CHARS, EVAL_SEED = DEMO_DISTRACTORS, 512, 0


def eval_pool(rows: list[dict], chunk_chars: int) -> list[str]:
    """Every distinct chunk of a set's documents: where its items' distractors come from."""
    return list(dict.fromkeys(c for r in rows for c in own_chunks(r, chunk_chars)))


def eval_item(rec: dict, pool: list[str], i: int, with_oracle: bool, k: int, chunk_chars: int, seed: int) -> dict:
    """One scored item: the prompt shows k distractors plus the oracle (or k+1 distractors), like training.

    Distractors come from the item's own documents, then from every chunk of the set's other items;
    seeded by the item's id (or line), so the oracle and no-oracle prompts share their distractors."""
    rid = str(rec.get("id") if rec.get("id") is not None else i)
    rng = seeded(seed, rid)
    oracle = oracle_chunk(rec, chunk_chars)
    exclude = {oracle} if oracle is not None else set()
    docs = draw_distractors(rng, rec["answer"], exclude, own_chunks(rec, chunk_chars), pool, k + 1)
    shown = docs[:k] + [oracle] if with_oracle and oracle is not None else docs
    rng.shuffle(shown)
    return {"id": rid, "question": rec["question"], "answer": rec["answer"], "shown": shown,
            "prompt": prompt(rec["question"], shown)}
