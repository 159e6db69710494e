"""evaluate — score a saved model on the gate's lm-eval tasks, as a Prefect task of its own.

The library (task lists, the lm-eval call, per-item scores, the content-keyed cache) is
`stagewise/evaluation.py`: every step that scores a model calls it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from stagewise.config import EvaluateConfig
from stagewise.evaluation import evaluate
from stagewise.workspace import Workspace


@task(name="evaluate", retries=0)
def evaluate_task(model_dir: Path, tasks: list[str], ws: Workspace, cfg: EvaluateConfig) -> dict:
    """Score a saved model on the lm-eval tasks in evals/ (cached by content)."""
    return evaluate(model_dir, tasks, ws, cfg)
