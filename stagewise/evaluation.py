"""Evaluation — score a model on lm-eval task YAMLs: the compiled `evaluate.sets` (stagewise/evalsets.py)
plus `evaluate.tasks` (harness names or YAML paths).

The evaluations are plain lm-eval tasks: `lm_eval --model hf --model_args pretrained=<model folder>
--include_path reports/<run>/evals --tasks sw_instruct --apply_chat_template` gives the same numbers
as this function (docs/evaluation.md). Here we only add what the gate needs on
top of `lm_eval.simple_evaluate`: per-item scores (for bootstrap confidence intervals), a bootstrap
stderr for metrics lm-eval gives none for (perplexities), and an on-disk cache keyed by content.

Which tasks run under the chat template is declared in each YAML (`metadata.chat_template`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from stagewise.config import EvaluateConfig, hash_obj
from stagewise.errors import UserError
from stagewise.metrics import metric as metric_info
from stagewise.workspace import Workspace

# What each stage is judged on and the forgetting guard's metrics are declared in params.yaml
# (`<stage>.target`, `gate.general`, `evaluate.sets`) and resolved by stagewise/evalsets.py:plan;
# the sets compile into the lm-eval YAMLs this module scores (stagewise/evalsets.py:compiled_dir).

_CWD_LOCK = threading.Lock()  # chdir is process-wide: one evaluation at a time per process


class EvaluationError(UserError):
    """An evaluation that cannot run, phrased for the person who has to fix it: one `error:` line, exit 2
    (a missing benchmark file, an undeclared task, a folder without weights), never a traceback."""


# ---------------------------------------------------------------- metric helpers (shared with gate)
def aggregate(metric: str, items: list) -> float:
    """lm-eval's aggregation of per-item scores (weighted perplexity, bits per byte, or mean)."""
    if metric_info(metric).ratio:   # (loglikelihood, count) pairs: a ratio of sums, not a mean
        ll = sum(float(x[0]) for x in items)
        count = sum(float(x[1]) for x in items)
        if metric == "bits_per_byte":
            return -ll / count / math.log(2)
        return math.exp(-ll / count)
    return sum(float(x) for x in items) / len(items)


def bootstrap_stderr(metric: str, items: list, iters: int, seed: int = 0) -> float | None:
    """Standard deviation of the metric over bootstrap resamples of the items."""
    import numpy as np

    if len(items) < 2 or iters < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(items), size=(iters, len(items)))
    vals = [aggregate(metric, [items[i] for i in row]) for row in idx]
    return float(np.std(vals, ddof=1))


# ---------------------------------------------------------------- hashing (cache keys)
def _hash_file(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hash(model_dir: Path) -> str:
    """Content hash of a saved model folder: weights, config and tokenizer (chat template included)."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise EvaluationError(f"{model_dir}: no model weights (*.safetensors) found; pass the folder a "
                              "stage saved with save_pretrained()")
    return hash_obj({p.name: _hash_file(p) for p in files})


def _memory_hash(model, tokenizer) -> str:
    """Content hash of an in-memory model and tokenizer (same role as model_hash for a folder)."""
    import xxhash

    from stagewise.hashing import hash_weights

    h = xxhash.xxh3_128()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else str(tokenizer.get_vocab())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return hash_weights(h, model).hexdigest()


def task_hash(entry_cfg: dict, yaml_path: Path | None, root: Path) -> str:
    """Hash of what defines a local task: its resolved YAML config and its data files' contents."""
    files = ((entry_cfg.get("dataset_kwargs") or {}).get("data_files") or {})
    if isinstance(files, str):
        files = {"test": files}
    data = {}
    for split, rel in files.items():
        for one in [rel] if isinstance(rel, str) else rel:
            p = (root / one) if not Path(one).is_absolute() else Path(one)
            if not p.exists():
                raise EvaluationError(
                    f"{yaml_path}: data file {one!r} ({split}) not found under {root}; run the `generate` "
                    "step (or point data_files at your benchmark JSONL, relative to the workspace root)")
            data[f"{split}:{one}"] = _hash_file(p)
    return hash_obj({"cfg": json.loads(json.dumps(entry_cfg, default=str)), "data": data})


@contextlib.contextmanager
def _in_dir(path: Path):
    # lm-eval resolves relative `data_files` against the cwd: run from the workspace root.
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)


# ---------------------------------------------------------------- the step
def evaluate(model_dir: Path, tasks: list[str], ws: Workspace, cfg: EvaluateConfig, model=None,
             tokenizer=None, tasks_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval tasks on a saved model folder (or an in-memory model) → per-task metrics + per-item samples.

    Returns {task: {metric: value, f"{metric}_stderr": float|None, "n": int, "doc_ids": [...],
    "samples": {metric: [per-item score]}}}. Per-item scores are floats, or [loglikelihood, count]
    pairs for perplexity-like metrics. `model` (and `tokenizer`, else read from `model_dir`) skips loading
    the weights: in-process use, e.g. a dynamically quantized candidate that exists only in memory.
    `tasks_dir`: the folder of task YAMLs (the compiled `evaluate.sets`, stagewise/evalsets.py:compiled_dir;
    default the workspace's evals/); `evaluate.tasks` YAML paths are added to it, harness names run
    from lm-eval's own task index.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from stagewise.evalsets import resolve_path

    model_dir = Path(model_dir)
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else ws.evals
    yamls = [resolve_path(t, ws.root) for t in cfg.tasks if t.endswith((".yaml", ".yml"))]
    harness = set(cfg.extra_tasks) | {t for t in cfg.tasks if not t.endswith((".yaml", ".yml"))}
    include = list(dict.fromkeys([str(tasks_dir), *(str(p.parent) for p in yamls)]))
    tm_local = TaskManager(include_path=include if len(include) > 1 else include[0], include_defaults=False)
    extra = [t for t in tasks if t in harness and t not in tm_local.task_index]
    local = [t for t in tasks if t not in extra]
    unknown = [t for t in local if t not in tm_local.task_index]
    if unknown:
        raise EvaluationError(
            f"unknown eval task(s) {unknown}: not declared under evaluate.sets nor listed in evaluate.tasks "
            f"(params.yaml). Known local tasks: {sorted(tm_local.all_subtasks)}")

    if model is not None and tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    mhash = _memory_hash(model, tokenizer) if model is not None else model_hash(model_dir)
    version = getattr(lm_eval, "__version__", "?")
    cache_dir = ws.root / cfg.cache_dir / mhash
    keys: dict[str, str] = {}
    # `!function` helpers (evals/*.py) shape the scores too: their source is part of every local key.
    helpers = {p.name: _hash_file(p) for d in include for p in sorted(Path(d).glob("*.py"))}
    for t in local:
        entry = tm_local.task_index[t]
        keys[t] = hash_obj({"task": task_hash(entry.cfg or {}, entry.yaml_path, ws.root), "limit": cfg.limit,
                            "lm_eval": version, "helpers": helpers})
    for t in extra:
        keys[t] = hash_obj({"task": t, "limit": cfg.limit, "lm_eval": version})

    results: dict[str, dict] = {}
    todo: list[str] = []
    for t in tasks:
        f = cache_dir / f"{t}-{keys[t]}.json"
        if f.exists():
            results[t] = json.loads(f.read_text()) | {"cached": True}
        else:
            todo.append(t)
    if not todo:
        return results

    _quiet_git_hash()
    lm = _load_lm(model_dir, cfg, model, tokenizer)
    # One simple_evaluate call per (task manager, chat template) group: the flag is global per call.
    groups: dict[tuple[bool, bool], list[str]] = {}
    for t in todo:
        is_local = t in local
        chat = bool(((tm_local.task_index[t].cfg or {}).get("metadata") or {}).get("chat_template")) if is_local \
            else cfg.extra_tasks_chat_template
        groups.setdefault((is_local, chat), []).append(t)
    for (is_local, chat), names in groups.items():
        tm = tm_local if is_local else TaskManager()
        with _in_dir(ws.root):
            out = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=tm, limit=cfg.limit, apply_chat_template=chat,
                bootstrap_iters=cfg.bootstrap_iters, log_samples=True, batch_size=cfg.batch_size,
                random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            )
        for t in names:
            # a harness *group* (e.g. mmlu) has an aggregate but no per-item samples of its own
            res = _task_result(t, out["results"][t], out["samples"].get(t, []), cfg.bootstrap_iters)
            res["chat_template"] = chat
            f = cache_dir / f"{t}-{keys[t]}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(res))
            tmp.replace(f)
            results[t] = res | {"cached": False}
    return {t: results[t] for t in tasks}


def _quiet_git_hash() -> None:
    """lm-eval records `git describe` of the cwd (our workspace, often no repo) and lets git print
    "fatal: not a git repository" on every evaluation: the same lookup, with git's stderr captured."""
    import subprocess

    import lm_eval.evaluator

    def git_describe() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None

    lm_eval.evaluator.get_git_commit_hash = git_describe


def _bars_off() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


@functools.cache
def _hflm():
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM whose request progress bars follow TQDM_DISABLE (lm-eval passes tqdm an explicit
        `disable=`, which overrides the variable; the CLI sets it for non-interactive runs)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or _bars_off())

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or _bars_off())

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or _bars_off())

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # loglikelihood_rolling calls this with disable_tqdm=False hard-coded
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or _bars_off(),
                                                 override_bs=override_bs)

    return QuietHFLM


def _load_lm(model_dir: Path, cfg: EvaluateConfig, model=None, tokenizer=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        if (model_dir / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            # Score what would be served: the adapter merged into its base.
            model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                         trust_remote_code=cfg.trust_remote_code)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    model.eval()
    return _hflm()(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)


def _task_result(name: str, agg: dict, samples: list[dict], iters: int) -> dict:
    """Flatten lm-eval's "metric,filter" keys and attach per-item scores ordered by doc id."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    filters = {k.split(",", 1)[1] for k in agg if "," in k}
    first = sorted(filters)[0] if filters else "none"
    doc_ids = [s["doc_id"] for s in samples if s.get("filter", first) == first]
    out: dict[str, Any] = {"n": len(doc_ids), "doc_ids": doc_ids, "samples": {}}
    for key, value in agg.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, flt = key.split(",", 1)
        label = metric if len(filters) == 1 else f"{metric},{flt}"
        items = [s[metric] for s in samples if s.get("filter", flt) == flt and metric in s]
        items = [list(x) if isinstance(x, (tuple, list)) else float(x) for x in items]
        out[label] = float(value)
        out["samples"][label] = items
        stderr = agg.get(f"{metric}_stderr,{flt}")
        out[f"{label}_stderr"] = (float(stderr) if isinstance(stderr, (int, float)) and stderr == stderr
                                  else bootstrap_stderr(metric, items, iters))
    return out
