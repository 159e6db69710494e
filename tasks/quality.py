"""quality — heuristic quality filters; every removed record gets a reason code.

Corpus documents go through datatrove's implementations of the published rule sets, in FineWeb's
order: Gopher quality, Gopher repetition (Rae et al. 2021), C4 (Raffel et al. 2020), FineWeb
(Penedo et al. 2024). C4's line rules drop lines and keep the document (counted as `edited`); every
other rule drops the document. Chat, preference and verifiable records get their own rules (empty or
truncated replies, role order, chosen == rejected, unparseable answers, length bounds).
A filter returns None (keep) or a reason code, datatrove-style. Codes: docs/data.md.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Callable

from prefect import task

from stagewise import shards
from stagewise.config import OpsConfig, QualityConfig
from stagewise.records import StepOutput, input_kinds, progress, read_jsonl

Rule = Callable[[dict], str | None]

# datatrove's own code -> ours: a family prefix so the funnel reads by rule set
_PREFIX = {"gopher_quality": "", "gopher_repetition": "gopher_rep_", "c4": "c4_", "fineweb": "fineweb_"}


def quality(cfg: QualityConfig, in_dir: Path, out_dir: Path, ops: OpsConfig | None = None) -> dict:
    """Filter each <kind>.jsonl in in_dir; kept records to out_dir, the rest to removed/<reason>.jsonl.

    The records are judged in contiguous shards (one here; `ops.data_tasks` Ray tasks with
    `ops.engine: ray`) and the verdicts replayed in input order, so the outputs do not depend on
    how many shards judged them."""
    out = StepOutput("quality", out_dir)
    edited: Counter = Counter()
    kinds = input_kinds(in_dir)
    rows = {kind: read_jsonl(Path(in_dir) / f"{kind}.jsonl") for kind in kinds}
    n = shards.n_tasks(ops)
    cuts = {kind: shards.slices(len(rows[kind]), n) for kind in kinds}
    parts = [[{"kind": kind, "rec": rec} for kind in kinds for rec in rows[kind][slice(*cuts[kind][t])]]
             for t in range(n)]
    results = shards.run_tasks(judge, parts, ops, shared=cfg.model_dump(mode="json"), step="quality")
    verdicts = {kind: iter([v for part, res in zip(parts, results) for item, v in zip(part, res)
                            if item["kind"] == kind]) for kind in kinds}
    for kind in kinds:
        kept = []
        for rec in progress(rows[kind], f"quality {kind}"):
            v = next(verdicts[kind])
            out.input[kind] += 1
            for family in v["edited"]:
                edited[family] += 1
            if "text" in v:
                rec["text"] = v["text"]
            if v["reason"]:
                out.remove(kind, rec, v["reason"])
            else:
                kept.append(rec)
        out.keep(kind, kept)
    return out.finish(edited=dict(edited))


def judge(part: list[dict], cfg_json: dict) -> list[dict]:
    """One shard's verdicts, in order: the first rule's reason code (or None), and the C4 line edits."""
    cfg = QualityConfig.model_validate(cfg_json)
    edited: Counter = Counter()
    rules: dict[str, list[Rule]] = {}
    verdicts = []
    for item in part:
        kind, rec = item["kind"], item["rec"]
        if kind not in rules:
            rules[kind] = corpus_rules(cfg, edited) if kind == "corpus" else RECORD_RULES[kind](cfg)
        edited.clear()
        text = rec["text"] if kind == "corpus" else None
        reason = next((r for r in (rule(rec) for rule in rules[kind]) if r), None)
        v = {"reason": reason, "edited": list(edited)}
        if text is not None and rec["text"] != text:
            v["text"] = rec["text"]
        verdicts.append(v)
    return verdicts


# ---------------------------------------------------------------- corpus: datatrove filters
def corpus_rules(cfg: QualityConfig, edited: Counter) -> list[Rule]:
    """Gopher quality, Gopher repetition, C4, FineWeb — datatrove filters configured from cfg."""
    # Imported here: datatrove pulls in loguru/fsspec; `stagewise --help` must stay fast.
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter)

    tok = _regex_tokenizer()
    # datatrove skips a Gopher rule whose threshold is None; FineWeb and C4 take sentinels instead
    never = float("inf")
    filters = {
        "gopher_quality": GopherQualityFilter(
            min_doc_words=cfg.gopher_min_words, max_doc_words=cfg.gopher_max_words,
            min_avg_word_length=cfg.gopher_min_mean_word_len, max_avg_word_length=cfg.gopher_max_mean_word_len,
            max_symbol_word_ratio=cfg.gopher_max_symbol_word_ratio,
            max_bullet_lines_ratio=cfg.gopher_max_bullet_lines, max_ellipsis_lines_ratio=cfg.gopher_max_ellipsis_lines,
            max_non_alpha_words_ratio=cfg.gopher_min_alpha_words, min_stop_words=cfg.gopher_min_stop_words,
            language=tok),
        "gopher_repetition": GopherRepetitionFilter(
            dup_line_frac=cfg.gopher_max_dup_line_frac, dup_para_frac=cfg.gopher_max_dup_para_frac,
            dup_line_char_frac=cfg.gopher_max_dup_line_char_frac, dup_para_char_frac=cfg.gopher_max_dup_para_char_frac,
            top_n_grams=tuple((n, f) for n, f in sorted(cfg.gopher_max_top_ngram_char_frac.items()) if f is not None),
            dup_n_grams=tuple((n, f) for n, f in sorted(cfg.gopher_max_dup_ngram_char_frac.items()) if f is not None),
            language=tok),
        "c4": C4QualityFilter(
            filter_no_terminal_punct=cfg.c4_terminal_punct_lines,
            min_words_per_line=-1 if cfg.c4_min_words_per_line is None else cfg.c4_min_words_per_line,
            max_word_length=-1 if cfg.c4_max_word_len is None else cfg.c4_max_word_len,
            filter_javascript=cfg.c4_javascript_lines, filter_policy=cfg.c4_policy_lines,
            remove_citations=cfg.c4_remove_citations,
            min_num_sentences=-1 if cfg.c4_min_sentences is None else cfg.c4_min_sentences,
            filter_lorem_ipsum=cfg.c4_lorem_ipsum, filter_curly_bracket=cfg.c4_curly_bracket, language=tok),
        "fineweb": FineWebQualityFilter(
            line_punct_thr=-1.0 if cfg.fineweb_min_punct_line_ratio is None else cfg.fineweb_min_punct_line_ratio,
            short_line_thr=never if cfg.fineweb_max_short_line_ratio is None else cfg.fineweb_max_short_line_ratio,
            short_line_length=cfg.fineweb_short_line_chars,
            char_duplicates_ratio=never if cfg.fineweb_max_dup_line_char_ratio is None else cfg.fineweb_max_dup_line_char_ratio,
            new_line_ratio=never if cfg.fineweb_max_newline_ratio is None else cfg.fineweb_max_newline_ratio,
            language=tok),
    }

    def empty(rec: dict) -> str | None:
        # datatrove divides by the word count: an empty document must stop here
        return "empty_text" if not rec["text"].strip() or not tok.word_tokenize(rec["text"]) else None

    def run(family: str, f) -> Rule:
        def rule(rec: dict) -> str | None:
            doc = Document(text=rec["text"], id=rec["id"])
            res = f.filter(doc)
            if res is True:
                # C4 line rules rewrote it. datatrove also drops blank lines (paragraph breaks): when
                # that is all it did, the original text is kept.
                if doc.text != rec["text"] and doc.text != "\n".join(
                        ln.strip() for ln in rec["text"].splitlines() if ln.strip()):
                    edited[f"{family}_lines_removed"] += 1
                    rec["text"] = doc.text
                return None
            code = res[1] if isinstance(res, tuple) else "rejected"
            return code if code.startswith(_PREFIX[family] or "gopher_") else _PREFIX[family] + code

        return rule

    return [empty] + [run(name, f) for name, f in filters.items()]


def _regex_tokenizer():
    """datatrove's English word tokenizer is spaCy (a large dependency, slow here); a regex splitting
    words from punctuation gives the same counts on these rules. Sentences: datatrove's own regex."""
    from datatrove.utils.word_tokenizers import WhitespaceTokenizer

    class RegexWordTokenizer(WhitespaceTokenizer):
        _words = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")

        def word_tokenize(self, text: str) -> list[str]:
            return self._words.findall(text)

    return RegexWordTokenizer()


# ---------------------------------------------------------------- chat / preference / verifiable
def chat_rules(cfg: QualityConfig) -> list[Rule]:
    def no_response(rec):
        return None if any(m["role"] == "assistant" for m in rec["messages"]) else "chat_no_response"

    def role_order(rec):
        return None if roles_in_order([m["role"] for m in rec["messages"]]) else "chat_role_order"

    def empty_prompt(rec):
        return "chat_empty_prompt" if any(m["role"] == "user" and not m["content"].strip() for m in rec["messages"]) else None

    def empty_response(rec):
        # an assistant turn that only calls tools has no text of its own (stagewise/tools.py)
        return "chat_empty_response" if any(m["role"] == "assistant" and not m["content"].strip()
                                            and not m.get("tool_calls") for m in rec["messages"]) else None

    def truncated(rec):
        if cfg.chat_truncated_endings is None:
            return None
        last = rec["messages"][-1]["content"].rstrip()
        return None if last.endswith(tuple(cfg.chat_truncated_endings)) else "chat_truncated"

    def too_long(rec):
        n = sum(len(m["content"]) for m in rec["messages"])
        return "chat_too_long" if cfg.chat_max_chars is not None and n > cfg.chat_max_chars else None

    return [no_response, role_order, empty_prompt, empty_response, truncated, too_long]


def roles_in_order(roles: list[str]) -> bool:
    """Optional system first, then user/assistant alternating from user, tool turns only after an
    assistant turn, and the conversation ends with the assistant."""
    allowed = {None: {"system", "user"}, "system": {"user"}, "user": {"assistant"},
               "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}}
    prev = None
    for r in roles:
        if r not in allowed[prev]:
            return False
        prev = r
    return prev == "assistant"


def preference_rules(cfg: QualityConfig) -> list[Rule]:
    def empty(rec):
        return "pref_empty_field" if any(not rec[k].strip() for k in ("prompt", "chosen", "rejected")) else None

    def same(rec):
        return "pref_chosen_equals_rejected" if rec["chosen"].strip() == rec["rejected"].strip() else None

    def too_long(rec):
        n = len(rec["prompt"]) + len(rec["chosen"]) + len(rec["rejected"])
        return "pref_too_long" if cfg.pair_max_chars is not None and n > cfg.pair_max_chars else None

    return [empty, same, too_long]


def verifiable_rules(cfg: QualityConfig) -> list[Rule]:
    answer_re = re.compile(cfg.verifiable_answer_regex) if cfg.verifiable_answer_regex else None

    def empty(rec):
        return "verifiable_empty_prompt" if not rec["prompt"].strip() else None

    def answer(rec):
        if answer_re is None:
            return None
        return None if answer_re.fullmatch(rec["answer"].strip()) else "verifiable_answer_unparseable"

    def too_long(rec):
        n = len(rec["prompt"]) + len(rec["answer"])
        return "verifiable_too_long" if cfg.pair_max_chars is not None and n > cfg.pair_max_chars else None

    return [empty, answer, too_long]


def rag_rules(cfg: QualityConfig) -> list[Rule]:
    # whether the oracle holds the answer is the raft step's check (stagewise/rag.py), quarantined there
    def too_long(rec):
        n = len(rec["question"]) + len(rec["answer"]) + sum(map(len, rec.get("documents") or [])) \
            + len(rec.get("oracle_text") or "")
        return "rag_too_long" if cfg.pair_max_chars is not None and n > cfg.pair_max_chars else None

    return [too_long]


RECORD_RULES = {"chat": chat_rules, "preference": preference_rules, "verifiable": verifiable_rules,
                "rag": rag_rules}


@task(name="quality", retries=1)
def quality_task(cfg: QualityConfig, in_dir: Path, out_dir: Path, ops: OpsConfig | None = None) -> dict:
    """Apply the quality filters; removed records keep their reason code."""
    return quality(cfg, in_dir, out_dir, ops)
