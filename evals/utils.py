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
