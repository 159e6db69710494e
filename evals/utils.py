"""Metric helpers for evals/*.yaml (`!function utils.<name>`); lm-eval imports this file by path."""

import re
import string
from collections import Counter

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def _tokens(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def token_f1(references: list[str], predictions: list[str]) -> float:
    """SQuAD-style token F1 (lowercased, punctuation removed): partial credit where exact match has none.

    lm-eval ships no generation F1 of this kind (its `f1` is a label metric for multiple choice).
    """
    ref, pred = _tokens(references[0]), _tokens(predictions[0])
    common = sum((Counter(ref) & Counter(pred)).values())
    if not ref or not pred or not common:
        return float(ref == pred)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def preference_results(doc: dict, results: list) -> dict:
    """Chosen (choice 0) vs rejected (choice 1): acc, and the log-likelihood margin between them.

    The margin is what DPO optimizes (relative to its reference); acc saturates early on the demo
    world, where the parent already prefers the chosen answer for most pairs.
    """
    ll = [r[0] if isinstance(r, (tuple, list)) else r for r in results]
    return {"acc": float(ll[0] > ll[1]), "margin": float(ll[0] - ll[1])}


def sampled_pass1(doc: dict, results: list) -> dict:
    """Share of the k sampled replies (answers already extracted) equal to the reference answer."""
    answers = results[0]
    return {"pass1": sum(a == str(doc["answer"]).strip() for a in answers) / len(answers)}


# ---------------------------------------------------------------- tools sets (stagewise/evalsets.py: compile_tools)
# The rows carry tools and expected as JSON strings; the checker is stagewise/tools.py (BFCL's AST rules).
def tools_call_docs(dataset):
    """The items that expect at least one call."""
    import json

    return dataset.filter(lambda d: json.loads(d["expected"]) != [])


def tools_irrelevance_docs(dataset):
    """The items that expect no call (no declared tool fits)."""
    import json

    return dataset.filter(lambda d: json.loads(d["expected"]) == [])


def tools_results(doc: dict, results: list) -> dict:
    """call_accuracy (the AST match), parse_rate (a well-formed call), name_accuracy (the called names)."""
    import json

    from stagewise.tools import score_reply

    s = score_reply(results[0], json.loads(doc["tools"]), json.loads(doc["expected"]))
    return {k: s[k] for k in ("call_accuracy", "parse_rate", "name_accuracy")}


def tools_irrelevance_results(doc: dict, results: list) -> dict:
    """irrelevance_accuracy: the reply calls nothing (and is not a broken call)."""
    import json

    from stagewise.tools import score_reply

    return {"irrelevance_accuracy": score_reply(results[0], json.loads(doc["tools"]), [])["irrelevance_accuracy"]}


# ---------------------------------------------------------------- rag sets (stagewise/rag.py holds the format)
def _rag_docs(dataset, with_oracle: bool):
    """Each item's prompt: k distractor chunks (seeded per item: the item's own documents first, then
    every chunk of the set) and, `with_oracle`, the oracle chunk among them; shuffled."""
    from stagewise.rag import EVAL_CHUNK_CHARS, EVAL_DISTRACTORS, EVAL_SEED, eval_item, eval_pool

    rows = [dict(r) for r in dataset]
    pool = eval_pool(rows, EVAL_CHUNK_CHARS)
    items = [eval_item(r, pool, i, with_oracle, EVAL_DISTRACTORS, EVAL_CHUNK_CHARS, EVAL_SEED) for i, r in enumerate(rows)]
    import datasets

    return datasets.Dataset.from_list(items)


def rag_docs(dataset):
    """process_docs of a rag set: the oracle among the distractors."""
    return _rag_docs(dataset, True)


def rag_docs_no_oracle(dataset):
    """process_docs of `<set>_no_oracle`: distractors only (a model that reads should do worse here)."""
    return _rag_docs(dataset, False)


def rag_results(doc: dict, results: list) -> dict:
    """exact_match / token_f1 of the reply's `<ANSWER>:` part; quote_valid: it quotes, verbatim, a given document."""
    from stagewise.rag import answer_part, quote_valid

    reply = results[0]
    got = answer_part(reply)
    return {"exact_match": float(_tokens(got) == _tokens(doc["answer"])),
            "token_f1": token_f1([doc["answer"]], [got]),
            "quote_valid": quote_valid(reply, doc["shown"])}
