"""decontaminate — remove training records that overlap the evaluation sets the gate uses.

Documents (corpus): any word 13-gram (normalized text) shared with a benchmark item flags the
document (GPT-3 / lm-eval style). With `mode: excise`, the matched spans are cut out instead,
Janitor-style (a window around each match; left-over pieces shorter than `excise_min_chars`
dropped; more than `excise_max_matches` separate matched regions drop the document).
Prompts (chat user turns, preference and verifiable prompts): flagged when >= 50% of the prompt's
distinct word 8-grams occur in one benchmark prompt (coverage is per item: templated prompts share
stock phrases with many items, and a leak is a copy of one item), or when a whole benchmark prompt
shorter than 8 words occurs in it. Every flagged record names the benchmark item it matched
(`<benchmark>:<item id>`); when several match equally, the item with the record's own field names
(a preference record -> a preference benchmark) comes first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
from prefect import task

from stagewise.config import DecontaminateConfig
from stagewise.records import (
    WORD_RE, BadInput, StepOutput, WordHasher, hash_docs, input_kinds, ngram_hashes, progress, prompt_texts,
    iter_jsonl, read_jsonl, words)


class GramIndex:
    """Hashed word n-grams -> every benchmark item holding them (sorted arrays; vectorized lookups)."""

    def __init__(self, hashes: np.ndarray, owners: np.ndarray):
        order = np.lexsort((owners, hashes))
        h, o = hashes[order], owners[order]
        keep = np.r_[True, (h[1:] != h[:-1]) | (o[1:] != o[:-1])] if len(h) else np.zeros(0, bool)
        self.hashes, self.owners = h[keep], o[keep]

    def __len__(self) -> int:
        return len(self.hashes)

    def matches(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gram position, benchmark item) for every gram found, one row per item holding it."""
        lo = np.searchsorted(self.hashes, grams, "left")
        cnt = np.searchsorted(self.hashes, grams, "right") - lo
        gi = np.repeat(np.arange(len(grams)), cnt)
        idx = np.repeat(lo, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        return gi, self.owners[idx]


def decontaminate(cfg: DecontaminateConfig, in_dir: Path, benchmarks_dir: Path | list[Path], out_dir: Path,
                  heldout: dict[str, Any] | None = None) -> dict:
    """Drop (or excise) records overlapping benchmarks; stats["contaminated"][kind][id] = "bench:item".

    `heldout` ({"kinds": [...], "share": f, "max": n}): first move that share of each listed kind into
    out_dir/heldout/<kind>.jsonl (eval-set shape, stagewise/evalsets.py) — the eval set of a stage the user
    declared none for — and decontaminate the rest against it like against any declared set.
    """
    out = StepOutput("decontaminate", out_dir)
    import shutil

    shutil.rmtree(out.out_dir / "heldout", ignore_errors=True)   # a share no longer asked for must not linger
    held = _hold_out(in_dir, out, heldout) if heldout and heldout.get("kinds") else {}
    files = _benchmark_files([*_as_list(benchmarks_dir), *held.values()])
    hasher = WordHasher()
    items: list[tuple[str, set[str]]] = []        # (<benchmark>:<item id>, its field names)
    texts = list(_benchmark_texts(files, cfg, items))   # (item number, text, is a prompt field)
    names = [ref for ref, _ in items]
    item_keys = [keys for _, keys in items]
    doc_index = _index([(o, t) for o, t, _ in texts], cfg.ngram, hasher, min_words=cfg.ngram)
    prompt_items = [(o, t) for o, t, is_prompt in texts if is_prompt]
    prompt_index = _index(prompt_items, cfg.short_ngram, hasher, min_words=cfg.short_ngram)
    # benchmark prompts shorter than short_ngram words: matched whole, per length
    short_index = {}
    for n in range(cfg.short_min_words, cfg.short_ngram):
        short = [(i, t) for i, t in prompt_items if len(words(t)) == n]
        if short:
            short_index[n] = _index(short, n, hasher, min_words=n)

    contaminated: dict[str, dict[str, str]] = {}
    excised: dict[str, dict[str, list[str]]] = {}
    for kind in input_kinds(in_dir):
        rows = list(read_jsonl(Path(in_dir) / f"{kind}.jsonl"))
        out.input[kind] = len(rows)
        if kind in held:
            taken = {r["id"] for r in read_jsonl(held[kind])}
            rows = [r for r in rows if r["id"] not in taken]
        hits = contaminated.setdefault(kind, {})
        kept = []
        if kind == "corpus":
            for rec, matched in zip(rows, _document_hits(rows, doc_index, cfg.ngram, hasher)):
                if not matched:
                    kept.append(rec)
                    continue
                refs = [names[m] for m in matched]
                if cfg.mode == "excise":
                    text = _excise(rec["text"], doc_index, cfg, hasher)
                    if text is not None:
                        excised.setdefault(kind, {})[rec["id"]] = refs
                        kept.append({**rec, "text": text})
                        continue
                hits[rec["id"]] = refs[0]
                out.remove(kind, rec, "contaminated", matched=refs[0], matched_all=refs, rule=f"{cfg.ngram}-gram")
        else:
            if kind == "rag":   # its documents are documents: a benchmark passage in them is a leak too
                rows = _rag_document_hits(rows, doc_index, cfg.ngram, hasher, names, out, hits)
            for rec in progress(rows, f"decontaminate {kind}"):
                found = _prompt_hit(prompt_texts(kind, rec), prompt_index, short_index, cfg, hasher)
                if found is None:
                    kept.append(rec)
                    continue
                best, rule, coverage = found
                # equal matches: the item with this record's field names first, then benchmark order
                owner = max(best, key=lambda o: (len(item_keys[o] & rec.keys()), -o))
                hits[rec["id"]] = names[owner]
                out.remove(kind, rec, "contaminated", matched=names[owner], rule=rule, coverage=round(coverage, 3))
        out.keep(kind, kept)
    return out.finish(contaminated=contaminated, excised=excised, mode=cfg.mode,
                      heldout={k: str(Path(v).relative_to(out.out_dir)) for k, v in held.items()},
                      benchmarks={f.stem: sum(1 for _ in read_jsonl(f)) for f in files},
                      references=[_shown(f, Path(in_dir).resolve().parent.parent) for f in files],
                      benchmark_grams={"document": len(doc_index), "prompt": len(prompt_index)})


def _shown(f: Path, root: Path) -> str:
    # relative to the workspace when inside it: stats.json is a DVC output and must hash the same in any clone
    try:
        return Path(f).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(f)


# ---------------------------------------------------------------- held-out shares
def _as_list(benchmarks: Path | list[Path]) -> list[Path]:
    if isinstance(benchmarks, (list, tuple)):
        return [Path(p) for p in benchmarks]
    b = Path(benchmarks)
    return sorted(b.glob("*.jsonl")) if b.is_dir() else [b]


def _eval_row(kind: str, rec: dict) -> dict | None:
    """A curated record in its eval-set shape (stagewise/evalsets.py); None when it has no such shape."""
    if kind == "corpus":
        return {"id": rec["id"], "text": rec["text"]}
    if kind == "chat":   # the first user turn and the reply to it (a text reply: not one that only calls tools)
        msgs = rec["messages"]
        for i, m in enumerate(msgs[:-1]):
            if m["role"] == "user" and msgs[i + 1]["role"] == "assistant" and not msgs[i + 1].get("tool_calls"):
                return {"id": rec["id"], "question": m["content"], "answer": msgs[i + 1]["content"]}
        return None
    if kind == "preference":
        return {"id": rec["id"], "prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
    return {"id": rec["id"], "prompt": rec["prompt"], "answer": rec["answer"]}


def heldout_ids(ids: list[str], share: float, limit: int) -> list[str]:
    """The held-out ids: those whose hash falls below `share`, at most `limit` (smallest hashes first).

    A hash of the id, not a shuffle: appending or removing other records never moves a record in or
    out of the held-out set, so an eval set stays comparable across data edits.
    """
    import xxhash

    scored = sorted((xxhash.xxh64_intdigest(i.encode()) / 2.0 ** 64, i) for i in ids)
    return [i for h, i in scored if h < share][:limit]


def _hold_out(in_dir: Path, out: StepOutput, spec: dict[str, Any]) -> dict[str, Path]:
    from stagewise.records import write_jsonl

    files = {}
    for kind in spec["kinds"]:
        src = Path(in_dir) / f"{kind}.jsonl"
        if not src.exists():
            continue
        rows = {r["id"]: r for r in read_jsonl(src)}
        chosen = [rows[i] for i in heldout_ids(list(rows), spec["share"], spec["max"])]
        evals = [(r, _eval_row(kind, r)) for r in chosen]
        evals = [(r, e) for r, e in evals if e is not None]
        if not evals:
            raise BadInput(src, None, f"no {kind} record could be held out as an eval set "
                           f"({len(rows)} records, evaluate.holdout_share={spec['share']})",
                           "declare an eval set for this stage under evaluate.sets, or raise evaluate.holdout_share")
        for r, _ in evals:
            out.remove(kind, r, "heldout_eval", eval_set=f"heldout_{kind}")
        files[kind] = out.out_dir / "heldout" / f"{kind}.jsonl"
        write_jsonl(files[kind], [e for _, e in evals])
    return files


# ---------------------------------------------------------------- benchmarks
def _benchmark_files(benchmarks: Path | list[Path]) -> list[Path]:
    if isinstance(benchmarks, (list, tuple)):
        files = [Path(p) for p in benchmarks]
    else:
        files = sorted(Path(benchmarks).glob("*.jsonl")) if Path(benchmarks).is_dir() else [Path(benchmarks)]
    for f in files:
        if not f.is_file():
            raise BadInput(f, None, "benchmark file not found", "pass the JSONL eval sets the gate uses (data/01_raw/benchmarks/*.jsonl)")
    if not files:
        raise BadInput(benchmarks, None, "no benchmark *.jsonl files here",
                       "decontamination needs the eval sets; run `generate` or pass --benchmark FILE")
    return files


def _benchmark_texts(files: list[Path], cfg: DecontaminateConfig,
                     items: list[tuple[str, set[str]]]) -> Iterator[tuple[int, str, bool]]:
    """(item number, text, is a prompt field) for every text field of every item; appends to items."""
    for f in files:
        for line, item in enumerate(iter_jsonl(f)):
            owner = len(items)
            items.append((f"{f.stem}:{item.get('id', line)}", set(item) - {"id"}))
            for key, value in item.items():
                if key == "id":
                    continue
                for text in _strings(value):
                    yield owner, text, key in cfg.prompt_fields
            # a chat-shaped item (a tools set): its user turns are prompts
            if isinstance(item.get("messages"), list):
                for m in item["messages"]:
                    if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                        yield owner, m["content"], True
            # multiple choice: the context followed by the gold continuation is what a leak looks like
            if isinstance(item.get("context"), str) and isinstance(item.get("choices"), list) and isinstance(item.get("gold"), int):
                if 0 <= item["gold"] < len(item["choices"]):
                    yield owner, f"{item['context']} {item['choices'][item['gold']]}", False


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _index(texts: list[tuple[int, str]], n: int, hasher: WordHasher, min_words: int) -> GramIndex:
    texts = [(o, t) for o, t in texts if len(words(t)) >= min_words]
    if not texts:
        return GramIndex(np.zeros(0, np.uint64), np.zeros(0, np.int64))
    wh, starts, lengths = hash_docs((t for _, t in texts), hasher)
    grams, counts = ngram_hashes(wh, starts, lengths, n, short=False)
    return GramIndex(grams, np.repeat(np.asarray([o for o, _ in texts], np.int64), counts))


# ---------------------------------------------------------------- matching
def _document_hits(rows: list[dict], index: GramIndex, n: int, hasher: WordHasher) -> Iterator[list[int]]:
    """Per document: the distinct benchmark items it shares an n-gram with (first match first)."""
    for b0 in progress(range(0, len(rows), 2048), "decontaminate corpus", unit="batch"):
        batch = rows[b0:b0 + 2048]
        wh, starts, lengths = hash_docs((r["text"] for r in batch), hasher)
        grams, counts = ngram_hashes(wh, starts, lengths, n, short=False)
        gi, owner = index.matches(grams)
        doc = np.repeat(np.arange(len(batch)), counts)[gi]
        found: dict[int, list[int]] = {}
        for d, o in zip(doc.tolist(), owner.tolist()):
            found.setdefault(d, []).append(o)
        for d in range(len(batch)):
            yield list(dict.fromkeys(found.get(d, [])))


def _rag_document_hits(rows: list[dict], index: GramIndex, n: int, hasher: WordHasher, names: list[str],
                       out: StepOutput, hits: dict[str, str]) -> list[dict]:
    """rag records whose documents share an n-gram with a benchmark item are removed; the rest returned."""
    texts = [{"text": "\n".join([*(r.get("documents") or []), r.get("oracle_text") or ""])} for r in rows]
    kept = []
    for rec, matched in zip(rows, _document_hits(texts, index, n, hasher)):
        if not matched:
            kept.append(rec)
            continue
        hits[rec["id"]] = names[matched[0]]
        out.remove("rag", rec, "contaminated", matched=names[matched[0]], rule=f"{n}-gram (documents)")
    return kept


def _prompt_hit(texts: list[str], index: GramIndex, short_index: dict[int, GramIndex], cfg: DecontaminateConfig,
                hasher: WordHasher) -> tuple[list[int], str, float] | None:
    """(best-matching benchmark items, rule, coverage) for the first prompt text that is contaminated."""
    for text in texts:
        wh, starts, lengths = hash_docs([text], hasher)
        n_words = int(lengths[0])
        if n_words >= cfg.short_ngram and len(index):
            grams, _ = ngram_hashes(wh, starts, lengths, cfg.short_ngram, short=False)
            grams = np.unique(grams)
            _, owner = index.matches(grams)
            if len(owner):
                vals, cnt = np.unique(owner, return_counts=True)
                coverage = cnt.max() / len(grams)
                if coverage >= cfg.short_coverage:
                    return vals[cnt == cnt.max()].tolist(), f"{cfg.short_ngram}-gram coverage", float(coverage)
        for n, idx in short_index.items():  # a short benchmark prompt contained whole
            if n <= n_words:
                grams, _ = ngram_hashes(wh, starts, lengths, n, short=False)
                _, owner = idx.matches(grams)
                if len(owner):
                    return sorted(set(owner.tolist())), "contains benchmark prompt", 1.0
    return None


def _excise(text: str, index: GramIndex, cfg: DecontaminateConfig, hasher: WordHasher) -> str | None:
    """Cut matched n-gram spans (plus a window) out of a document; None if too dirty or nothing left."""
    import unicodedata

    text = unicodedata.normalize("NFKC", text)
    spans = [(m.start(), m.end()) for m in WORD_RE.finditer(text)]
    wh = np.asarray(hasher([text[s:e].lower() for s, e in spans]), np.uint64)
    if len(wh) < cfg.ngram:
        return None
    grams, _ = ngram_hashes(wh, np.zeros(1, np.int64), np.asarray([len(wh)]), cfg.ngram, short=False)
    starts = np.unique(index.matches(grams)[0]).tolist()
    regions: list[list[int]] = []          # overlapping matched n-grams merge into one region (word span)
    for s in starts:
        if regions and s <= regions[-1][1]:
            regions[-1][1] = s + cfg.ngram - 1
        else:
            regions.append([s, s + cfg.ngram - 1])
    if not regions or len(regions) > cfg.excise_max_matches:
        return None
    cuts = [(max(0, spans[a][0] - cfg.excise_window_chars), min(len(text), spans[b][1] + cfg.excise_window_chars))
            for a, b in regions]
    pieces, pos = [], 0
    for a, b in cuts:
        if a > pos:
            pieces.append(text[pos:a])
        pos = max(pos, b)
    pieces.append(text[pos:])
    pieces = [p.strip() for p in pieces if len(p.strip()) >= cfg.excise_min_chars]
    return "\n\n".join(pieces) if pieces else None


@task(name="decontaminate", retries=1)
def decontaminate_task(cfg: DecontaminateConfig, in_dir: Path, benchmarks_dir: Path | list[Path], out_dir: Path,
                       heldout: dict[str, Any] | None = None) -> dict:
    """Hold out eval shares where none is declared; remove (or excise) training records overlapping any eval set."""
    return decontaminate(cfg, in_dir, benchmarks_dir, out_dir, heldout)
