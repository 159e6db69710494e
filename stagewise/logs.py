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
    # transformers 5 renamed the option TRL's configs still set; nothing for a user to change
    r".*`?(is_)?gradient_checkpointing`? is deprecated.*",
]
# Loggers whose warnings are noise here: bitsandbytes says its optional fused CPU kernels are missing
# (the fallback is what runs on CPU anyway).
_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
_quiet = False


class _LibraryInfoFilter(logging.Filter):
    """Below WARNING, only Stagewise's own records reach the console (libraries log INFO freely)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] == "stagewise"


def quiet_again(*names: str) -> None:
    """Re-quiet loggers a library reconfigures when it is imported (dvc sets itself to INFO with its
    own console handlers). No-op with --verbose or when `configure` was never called."""
    if _quiet:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)


def quiet_noisy_loggers() -> None:
    """The known-harmless library warnings off, for every command (those that never call `configure`
    too: `stagewise download`, `gate`, … load bitsandbytes models as well)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def configure(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("stagewise").setLevel(level)
    if verbose:
        return
    global _quiet
    _quiet = True
    for handler in logging.getLogger().handlers:
        handler.addFilter(_LibraryInfoFilter())
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
    for name in ("lm_eval", "mlflow.transformers", "mlflow.models", *_NOISY_LOGGERS):
        logging.getLogger(name).setLevel(logging.ERROR)
