"""The one table of metrics: which way is better, and how a change is measured.

Read by evaluation (how per-item scores aggregate), the gate (points vs per cent, the direction of a
rule) and compression (the candidate check). A metric is looked up by its last name component, so
`sw_general_text.word_perplexity`, `sw_general_text/word_perplexity` and `word_perplexity` agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("accuracy", "perplexity", "loss", "margin")


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    kind: str            # accuracy: a share in [0, 1], changes in points · perplexity / loss: changes in %
                         # margin: an unbounded score, changes in its own units
    ratio: bool = False  # per-item values are (loglikelihood, count) pairs: aggregate = ratio of sums

    @property
    def relative(self) -> bool:
        """Compared in % change (perplexity-like), not in points."""
        return self.kind in ("perplexity", "loss")


_TABLE = {m.name: m for m in (
    Metric("acc", True, "accuracy"),
    Metric("acc_norm", True, "accuracy"),
    Metric("exact_match", True, "accuracy"),
    Metric("pass1", True, "accuracy"),
    Metric("token_f1", True, "accuracy"),
    Metric("f1", True, "accuracy"),
    Metric("quote_valid", True, "accuracy"),   # rag sets: the reply quotes a given document verbatim
    Metric("margin", True, "margin"),
    Metric("call_accuracy", True, "accuracy"),          # tools sets (stagewise/tools.py)
    Metric("parse_rate", True, "accuracy"),
    Metric("name_accuracy", True, "accuracy"),
    Metric("irrelevance_accuracy", True, "accuracy"),
    Metric("word_perplexity", False, "perplexity", ratio=True),
    Metric("byte_perplexity", False, "perplexity", ratio=True),
    Metric("bits_per_byte", False, "perplexity", ratio=True),
    Metric("perplexity", False, "perplexity"),
    Metric("nll", False, "loss"),
    Metric("loss", False, "loss"),
)}


def metric(name: str) -> Metric:
    """The table's entry for `name` (`task.metric`, `task/metric`, `general_nll`, `acc,none` …).

    A metric the table does not know is taken as an accuracy-like score, higher is better: lm-eval's
    own default for a task metric."""
    last = re.split(r"[./]", name.split(",")[0])[-1]
    if last in _TABLE:
        return _TABLE[last]
    suffix = last.rpartition("_")[2]
    if suffix in _TABLE and _TABLE[suffix].kind in ("loss", "perplexity"):   # general_nll, task_loss
        return _TABLE[suffix]
    return Metric(last, True, "accuracy")


def higher_is_better(name: str) -> bool:
    return metric(name).higher_is_better
