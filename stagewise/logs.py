"""Quiet by default: one readable line per event from Stagewise, library chatter only with --verbose."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Warnings that say nothing actionable to a pipeline user (checked against the pinned versions).
_NOISE = [
    r".*torch_dtype.*is deprecated.*",
    r".*The model card could not be retrieved.*",
    r".*Unable to find license information.*",
    r".*pkg_resources is deprecated.*",
    r".*kernels.*not installed.*",
    r".*`resume_download` is deprecated.*",
    r".*Using the `WANDB_DISABLED`.*",
]


def configure(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("stagewise").setLevel(level)
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if not sys.stderr.isatty():  # progress bars only for a person watching; logs get step lines instead
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("mlflow", "alembic", "dvc", "great_expectations", "lm_eval", "httpx", "transformers",
                 "datasets", "accelerate", "bitsandbytes", "prefect"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # lm-eval warns per task about defaults we rely on; mlflow about hub model cards it cannot reach offline.
    for name in ("lm_eval", "mlflow.transformers", "mlflow.models"):
        logging.getLogger(name).setLevel(logging.ERROR)
