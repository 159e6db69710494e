"""Shared record I/O for the data steps: schemas, atomic JSONL, text normalization, n-gram hashes, stats.

Record kinds (docs/data.md): corpus {id, text}, chat {id, messages}, preference {id, prompt, chosen,
rejected}, verifiable {id, prompt, answer}. Every step reads `<kind>.jsonl` from its input folder and
writes `<kind>.jsonl`, `removed/<reason>.jsonl` and `stats.json` to its output folder.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from stagewise.errors import UserError
from stagewise.workspace import KINDS

# The fields each kind needs (id is optional on input, always a string on output).
FIELDS: dict[str, tuple[str, ...]] = {
    "corpus": ("text",),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "verifiable": ("prompt", "answer"),
    "rag": ("question", "answer"),   # + documents/oracle or oracle_text (stagewise/rag.py)
}
EXAMPLE = {
    "corpus": '{"id": "doc-1", "text": "..."}',
    "chat": '{"id": "c-1", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "preference": '{"id": "p-1", "prompt": "...", "chosen": "...", "rejected": "..."}',
    "verifiable": '{"id": "v-1", "prompt": "...", "answer": "42"}',
    "rag": '{"id": "r-1", "question": "...", "answer": "...", "documents": ["...", "..."], "oracle": 0}',
}
ROLES = {"system", "user", "assistant", "tool"}


# ---------------------------------------------------------------- errors
class BadInput(UserError, ValueError):
    """Input the pipeline cannot read, phrased for the person who has to fix it: file, line, fix."""

    def __init__(self, file: str | Path, line: int | None, problem: str, fix: str, code: str = "bad_input"):
        self.file, self.line, self.problem, self.fix, self.code = str(file), line, problem, fix, code
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {problem}\n  fix: {fix}")


class BadRow(Exception):
    """One unreadable row; ingest turns it into BadInput (fail) or a quarantine entry."""

    def __init__(self, code: str, problem: str, fix: str):
        super().__init__(problem)
        self.code, self.problem, self.fix = code, problem, fix


def check_record(kind: str, obj: Any, default_id: str) -> dict:
    """Validate one input object against its kind's schema; returns the normalized record.

    Raises BadRow with a reason code: bad_json (not an object), missing_field, wrong_type.
    """
    if not isinstance(obj, dict):
        raise BadRow("bad_json", f"expected a JSON object, got {type(obj).__name__}",
                     f"write one object per line, e.g. {EXAMPLE[kind]}")
    rec: dict[str, Any] = {}
    rid = obj.get("id", None)
    if rid is None:
        rid = default_id
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise BadRow("wrong_type", f"field 'id' must be a non-empty string or integer, got {rid!r}",
                     "use string ids, or drop the field to number records by line")
    rec["id"] = str(rid)
    for field in FIELDS[kind]:
        if field not in obj or obj[field] is None:
            raise BadRow("missing_field", f"missing field '{field}' for a {kind} record",
                         f"every {kind} record needs {', '.join(FIELDS[kind])} (id optional), e.g. {EXAMPLE[kind]}; "
                         "map other column names with data.sources.<name>.columns, or pass the right --kind")
        value = obj[field]
        if field == "messages":
            value = _check_messages(value)
        elif field == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # numbers are natural answers; downstream reads strings
        elif not isinstance(value, str):
            raise BadRow("wrong_type", f"field '{field}' must be a string, got {type(value).__name__} {_short(value)}",
                         f"store '{field}' as a JSON string")
        rec[field] = value
    for k, v in obj.items():  # keep the user's extra fields (source, url, ...) untouched
        if k not in rec:
            rec[k] = v
    if kind == "chat":
        _check_tool_use(rec)
    if kind == "rag":
        _check_rag_shape(rec)
    return rec


def _check_tool_use(rec: dict) -> None:
    """Declared tools, calls and results of a chat record agree (stagewise/tools.py: check_chat)."""
    from stagewise.tools import ToolError, check_chat, has_tools

    if not has_tools(rec):
        return
    try:
        check_chat(rec)
    except ToolError as e:
        raise BadRow(e.code, e.problem, e.fix) from None


def _check_rag_shape(rec: dict) -> None:
    """Types only: whether the oracle holds the answer, and whether distractors exist, is the raft
    step's check (quarantined there, the run goes on)."""
    from stagewise.rag import RagProblem, check_rag

    try:
        check_rag(rec)
    except RagProblem as p:
        if p.code in ("wrong_type", "missing_field"):
            raise BadRow(p.code, p.problem, p.fix) from None


def _check_messages(value: Any) -> list:
    fix = 'messages is a list of {"role": "user"|"assistant"|"system"|"tool", "content": "<string>"}'
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"field 'messages' must be a list, got {type(value).__name__}", fix)
    # an assistant turn that only calls tools may leave content out (OpenAI sends null): stored as ""
    value = [{**m, "content": ""} if isinstance(m, dict) and m.get("tool_calls") and m.get("content") is None else m
             for m in value]
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow("wrong_type" if not isinstance(m, dict) else "missing_field",
                         f"messages[{i}] must be an object with 'role' and 'content', got {_short(m)}", fix)
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise BadRow("wrong_type", f"messages[{i}].role is {m['role']!r}, not one of {sorted(ROLES)}", fix)
        if not isinstance(m["content"], str):
            raise BadRow("wrong_type", f"messages[{i}].content must be a string, got {type(m['content']).__name__}", fix)
    return value


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def detect_kind(obj: Any) -> str | None:
    """The record kind an input object looks like (for the standalone CLI without --kind)."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "documents" in obj or "oracle_text" in obj:
        return "rag"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "answer" in obj:
        return "verifiable"
    if "text" in obj:
        return "corpus"
    return None


# ---------------------------------------------------------------- text views and normalization
WORD_RE = re.compile(r"\w+")


def normalize(text: str) -> str:
    """NFKC, lowercase, punctuation and whitespace collapsed: what exact dedup hashes."""
    return " ".join(words(text))


def words(text: str) -> list[str]:
    """Normalized words: what MinHash shingles and decontamination n-grams are made of."""
    return WORD_RE.findall(unicodedata.normalize("NFKC", text).lower())


def dedup_text(kind: str, rec: dict) -> str:
    """The text a record is deduplicated on: chat on the full conversation, pairs on the prompt."""
    if kind == "corpus":
        return rec["text"]
    if kind == "chat":
        if _uses_tools(rec):
            from stagewise.tools import exchange_text

            return exchange_text(rec)   # calls and results are part of the exchange
        return "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"])
    if kind == "rag":
        return rec["question"]
    return rec["prompt"]


def _uses_tools(rec: dict) -> bool:
    return bool(rec.get("tools")) or any(m.get("tool_calls") or m["role"] == "tool" for m in rec["messages"])


def prompt_texts(kind: str, rec: dict) -> list[str]:
    """The short texts decontamination checks for a non-corpus record (each user turn, or the prompt)."""
    if kind == "chat":
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        if _uses_tools(rec):
            from stagewise.tools import exchange_text

            users.append(exchange_text(rec))   # a leaked call or result counts too
        return users
    if kind == "rag":
        return [rec["question"]]
    return [rec["prompt"]]


# ---------------------------------------------------------------- n-gram hashes (numpy)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# odd multipliers, one per position in an n-gram: the hash of (a, b) differs from (b, a)
_POS = np.random.default_rng(0x5EED).integers(1, 2**63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized: spreads every input bit over the 64-bit output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WordHasher(dict):
    """Word -> stable 64-bit hash (xxh3), cached: independent of process, corpus and order.

    A dict whose misses compute the hash: `map(hasher.__getitem__, words)` runs the lookups in C,
    which is most of the speed of MinHash on short documents (bench/dedup.py).
    """

    MAX_WORDS = 5_000_000  # bound memory on huge vocabularies

    def __init__(self) -> None:
        super().__init__()
        import xxhash

        self._h = xxhash.xxh3_64_intdigest

    def __missing__(self, w: str) -> int:
        # 63 bits: numpy converts Python ints below 2^63 to int64 4x faster than to uint64
        v = self[w] = self._h(w.encode()) & 0x7FFFFFFFFFFFFFFF
        return v

    def __call__(self, ws: list[str]) -> list[int]:
        return list(map(self.__getitem__, ws))


def ngram_hashes(wh: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n: int,
                 short: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram of many documents at once.

    wh: concatenated word hashes (uint64); starts/lengths: each document's slice. A document shorter
    than n words gives one gram of all its words when `short` (MinHash convention), none otherwise.
    Returns (gram hashes, number of grams per document).
    """
    lengths = lengths.astype(np.int64)
    counts = np.maximum(lengths - n + 1, 0)
    if short:
        counts = np.where((lengths > 0) & (lengths < n), 1, counts)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.uint64), counts
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    pos = starts.astype(np.int64)[doc] + (np.arange(total) - first)      # gram start in wh
    end = (starts.astype(np.int64) + lengths)[doc]
    padded = np.concatenate([wh.astype(np.uint64), np.zeros(n, np.uint64)])
    h = np.zeros(total, np.uint64)
    for k in range(n):
        idx = pos + k
        h += np.where(idx < end, padded[idx], np.uint64(0)) * _POS[k]
    return mix64(h ^ np.uint64(n)), counts


def hash_docs(texts: Iterable[str], hasher: WordHasher | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(concatenated word hashes, starts, lengths) for texts."""
    hasher = hasher if hasher is not None else WordHasher()
    if len(hasher) > hasher.MAX_WORDS:
        hasher.clear()
    ws = [words(t) for t in texts]
    lengths = np.fromiter(map(len, ws), np.int64, len(ws))
    wh = np.fromiter(map(hasher.__getitem__, chain.from_iterable(ws)), np.int64, int(lengths.sum())).view(np.uint64)
    return wh, np.cumsum(lengths) - lengths, lengths


_WORD_BYTE = np.zeros(256, bool)
_WORD_BYTE[[*range(ord("0"), ord("9") + 1), *range(ord("a"), ord("z") + 1), ord("_"), *range(0x80, 0x100)]] = True
_P = 0x100000001B3  # FNV prime: odd, so invertible mod 2^64
_P_INV = pow(_P, -1, 2**64)
_POWERS: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]  # P^j, P^-j; grown on demand


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_POWERS[0]) < n:
        m = max(n, 2 * len(_POWERS[0]))
        _POWERS[0] = np.cumprod(np.full(m, _P, np.uint64))
        _POWERS[1] = np.cumprod(np.full(m, _P_INV, np.uint64))
    return _POWERS[0][:n], _POWERS[1][:n]


def hash_docs_bytes(texts: list[str], batch: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hash_docs without a Python loop over words: what MinHash dedup uses (bench/dedup.py: ~2x).

    Words are runs of [0-9a-z_] or non-ASCII bytes in the NFKC-lowercased UTF-8 text (the same as
    `words()` for ASCII text; non-ASCII punctuation such as an em dash joins words). Each word's
    hash is a polynomial over its bytes mod 2^64 from prefix sums, made position-independent with
    the inverse power, then mixed: the same word always gets the same hash.
    """
    out_wh, out_len = [], []
    for b0 in range(0, len(texts), batch):
        enc = [unicodedata.normalize("NFKC", t).lower().encode() for t in texts[b0:b0 + batch]]
        data = np.frombuffer(b" ".join(enc), np.uint8)          # the space keeps words inside documents
        doc_start = np.cumsum([0] + [len(e) + 1 for e in enc[:-1]])
        w = _WORD_BYTE[data]
        starts = np.flatnonzero(w & ~np.r_[False, w[:-1]])
        ends = np.flatnonzero(w & ~np.r_[w[1:], False]) + 1
        pw, inv = _powers(len(data))
        pre = np.concatenate([[np.uint64(0)], np.cumsum(data.astype(np.uint64) * pw)])
        raw = (pre[ends] - pre[starts]) * inv[starts]          # sum b_j P^(j - start + 1)
        out_wh.append(mix64(raw ^ (ends - starts).astype(np.uint64)))
        doc = np.searchsorted(doc_start, starts, side="right") - 1
        out_len.append(np.bincount(doc, minlength=len(enc)).astype(np.int64))
    wh = np.concatenate(out_wh) if out_wh else np.zeros(0, np.uint64)
    lengths = np.concatenate(out_len) if out_len else np.zeros(0, np.int64)
    return wh, np.cumsum(lengths) - lengths, lengths


# ---------------------------------------------------------------- JSONL and stats
def iter_jsonl(path: Path, required: Iterable[str] = ()) -> Iterator[dict]:
    """Rows of a JSONL file, streamed; a malformed row is a BadInput naming the file, the line and the fix.

    The one JSONL reader: data steps stream their own intermediate files through it, stages and
    evaluations read curated files and benchmarks with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing — run the data steps first (stagewise run), or check the path")
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(path, i, f"not valid JSON ({e.msg})", "one JSON object per line: fix or remove the line") from None
            miss = [k for k in required if not isinstance(row, dict) or k not in row]
            if miss:
                raise BadInput(path, i, f"missing field(s) {miss}", f"every row needs {list(required)}")
            yield row


def read_jsonl(path: Path, required: Iterable[str] = ()) -> list[dict]:
    """All rows of a JSONL file (iter_jsonl's checks)."""
    return list(iter_jsonl(path, required))


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Atomic: written to a temp file, renamed into place. Returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def read_stats(folder: Path) -> dict:
    return json.loads((Path(folder) / "stats.json").read_text())


def input_kinds(in_dir: Path) -> list[str]:
    return [k for k in KINDS if (Path(in_dir) / f"{k}.jsonl").exists()]


class StepOutput:
    """Collects one step's kept and removed records per kind, writes them, and builds stats.json.

    out_dir/<kind>.jsonl (kept), out_dir/removed/<reason>.jsonl (each row: kind, id, reason, the
    record, and details such as duplicate_of or matched), out_dir/stats.json.
    """

    def __init__(self, step: str, out_dir: Path):
        self.step, self.out_dir = step, Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # stale outputs of an earlier run must not survive (a reason that no longer fires, a kind gone)
        for k in KINDS:
            (self.out_dir / f"{k}.jsonl").unlink(missing_ok=True)
        for sub in ("removed", "quarantine"):
            d = self.out_dir / sub
            if d.is_dir():
                for f in d.glob("*.jsonl"):
                    f.unlink()
        self.input: Counter = Counter()
        self.kept: dict[str, list[dict]] = {}
        self.removed: dict[str, list[dict]] = defaultdict(list)
        self.removed_by_kind: dict[str, Counter] = defaultdict(Counter)

    def remove(self, kind: str, rec: dict | None, reason: str, rid: str | None = None, **details: Any) -> None:
        row = {"kind": kind, "id": rid if rid is not None else rec["id"], "reason": reason, **details}
        if rec is not None:
            row["record"] = rec
        self.removed[reason].append(row)
        self.removed_by_kind[kind][reason] += 1

    def keep(self, kind: str, rows: list[dict]) -> None:
        self.kept[kind] = rows

    def finish(self, **extra: Any) -> dict:
        for kind, rows in self.kept.items():
            write_jsonl(self.out_dir / f"{kind}.jsonl", rows)
        for reason, rows in self.removed.items():
            write_jsonl(self.out_dir / "removed" / f"{reason}.jsonl", rows)
        stats = {
            "step": self.step,
            "input": dict(self.input),
            "kept": {k: len(v) for k, v in self.kept.items()},
            "removed": {r: len(v) for r, v in sorted(self.removed.items())},
            "removed_by_kind": {k: dict(sorted(c.items())) for k, c in self.removed_by_kind.items()},
            **extra,
        }
        write_json(self.out_dir / "stats.json", stats)
        return stats


def removed_ids(out_dir: Path) -> dict[str, list[str]]:
    """reason -> ids, read back from out_dir/removed/ (what the CLI's REPORT.json lists)."""
    out: dict[str, list[str]] = {}
    for f in sorted((Path(out_dir) / "removed").glob("*.jsonl")):
        out[f.stem] = [r["id"] for r in read_jsonl(f)]
    return out


def progress(it: Iterable, desc: str, total: int | None = None, unit: str = "rec"):
    """A progress bar on long steps; silent when stderr is not a terminal (CI, tests, logs)."""
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, disable=not sys.stderr.isatty(), leave=False)
