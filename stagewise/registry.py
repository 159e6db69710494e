"""MLflow tracking + model registry: where versions, lineage and aliases live.

Aliases, not stages (deprecated in MLflow 3): `challenger` is the latest gated candidate, `champion`
moves only when its gate passed, `previous-champion` is what `stagewise rollback` returns to.
Every version is logged with MLflow's chat task (`llm/v1/chat`), so the registry serves itself, tool
calls included (the pyfunc flavour loads through stagewise/serving.py):

    mlflow models serve -m models:/stagewise@champion --env-manager local   # OpenAI-style /invocations

and loads anywhere with:

    mlflow.transformers.load_model("models:/stagewise@champion", return_type="components")
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

# The user's choice, read before anything in this process calls mlflow.set_tracking_uri() (which
# exports the variable itself and would otherwise pin every later workspace to the first one).
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
EXPERIMENT = "stagewise"
# The task every version is logged with: MLflow's OpenAI-compatible chat schema ({"messages": [...]}).
CHAT_TASK = "llm/v1/chat"
ADAPTER_DIR = "adapter"   # a LoRA/QLoRA stage's PEFT adapter inside its model folder (tasks/sft.py)
LINEAGE_KEYS = ("stage", "parent_version", "base_model", "data_hash", "config_hash", "code_version", "cache_key",
                "pipeline_run", "weights_hash")


def base_model_tag(base: str | None) -> str:
    """Where a version's chain of stages started: `model.base` (a hub id, a folder, `pkg://…`; credentials
    in a URI redacted) or "none" (random init). A registered version has no parent for the first stage
    over a base, so this is what names the base an adapter needs (docs/serving.md)."""
    from stagewise.redact import redact

    return redact(base) if base else "none"


def setup_tracking(root: Path, experiment: str = EXPERIMENT, private: bool = True) -> str:
    """Point MLflow at the workspace store (`mlflow/`) unless MLFLOW_TRACKING_URI says otherwise.

    A store copied or moved with its workspace is re-rooted first (health.reroot_tracking_store).

    The local store is checked first (stagewise/health.py): a missing, truncated or corrupt
    `mlflow.db` is a StoreError with the fix, never a silently created empty registry.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from stagewise.health import check_tracking_store, private_dir, private_file, reroot_tracking_store

    global _REGISTRY_LOCK
    store = Path(root) / "mlflow"
    if not _USER_TRACKING_URI:
        check_tracking_store(store)
        moved_from = reroot_tracking_store(store, experiment)   # a copied or moved workspace reads its own files
        if moved_from:
            import logging

            logging.getLogger("stagewise").info("tracking store moved from %s: artifact locations now point "
                                                "into %s", moved_from, store / "artifacts")
    private_dir(store, private)
    _REGISTRY_LOCK = Path(root) / ".stagewise" / "registry.lock"
    import mlflow

    uri = _USER_TRACKING_URI or f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            # An explicit artifact location: nothing lands in the cwd's ./mlruns.
            artifact_root = None if uri.startswith("http") else (store / "artifacts").resolve().as_uri()
            mlflow.create_experiment(experiment, artifact_location=artifact_root)
        mlflow.set_experiment(experiment)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/REST errors: one line naming the store
        from stagewise.errors import StoreError
        from stagewise.redact import redact

        raise StoreError(f"MLflow tracking store {redact(uri)} cannot be opened ({type(e).__name__}: "
                         f"{redact(str(e)).splitlines()[0][:200]}) — check MLFLOW_TRACKING_URI / the store, "
                         "or restore mlflow/mlflow.db from a backup") from e
    private_file(store / "mlflow.db", private and not _USER_TRACKING_URI)
    return uri


# The registry's own lock (promote, rollback, aliases): beside the workspace lock, so a
# `stagewise promote` never waits for a whole training run, but two alias moves never interleave.
_REGISTRY_LOCK: Path | None = None


@contextlib.contextmanager
def registry_lock(timeout: float = 120):
    from filelock import FileLock, Timeout

    from stagewise.errors import StoreError

    if _REGISTRY_LOCK is None:
        yield
        return
    _REGISTRY_LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(_REGISTRY_LOCK), thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise StoreError(f"{_REGISTRY_LOCK}: another promote/rollback holds the registry for over "
                         f"{timeout:.0f} s — wait for it, or check for a stuck `stagewise promote`") from None
    try:
        yield
    finally:
        lock.release()


_SAFE = __import__("re").compile(r"^[A-Za-z0-9_.\-]+$")


def check_name(value: str, what: str = "registered model name") -> str:
    """Names go into MLflow filter strings: only letters, digits, `_ . -` (no quotes to escape)."""
    from stagewise.errors import UserError

    if not isinstance(value, str) or not _SAFE.match(value):
        raise UserError(f"{what} {value!r}: use letters, digits, '_', '.' and '-' only "
                        "(e.g. --name stagewise or run.registered_model: stagewise)")
    return value


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def resaveable(model):
    """Let `save_pretrained` write a model that was loaded from bitsandbytes 4-bit weights.

    transformers 5 records the ops that built the parameters at load time and reverses them on save;
    the one that rebuilds 4-bit parameters from their serialized parts (`Bnb4bitDeserialize`) has no
    reverse, so saving raises NotImplementedError. Its reverse is the identity: a `Linear4bit`'s
    state dict already holds those serialized parts (packed weight, absmax, quant map, nested
    constants, quant state). Dropping the op from the record saves the same tensors that were loaded
    (tests/test_registry.py checks the bytes); a model with nothing to drop is returned unchanged.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            c for c in conversions
            if not any(type(op).__name__ == "Bnb4bitDeserialize" for op in getattr(c, "operations", None) or [])]
    return model


def log_model_version(model_dir: Path, registered_name: str, stage: str, lineage: dict[str, Any],
                      run_id: str, trust_remote_code: bool = False) -> str:
    """Log the HF folder as an MLflow transformers chat model inside `run_id`, register it, tag lineage.

    The MLmodel is MLflow's transformers one with its pyfunc flavour loading through
    stagewise/serving.py (request `tools` rendered as training rendered them, replies parsed into
    `tool_calls`); `mlflow.transformers.load_model` reads it as before (docs/serving.md#tool-calls).

    Called only after `model_dir` was written completely (stages save atomically), so a crash can
    never register a half-written model. A LoRA/QLoRA stage's adapter (`<model_dir>/adapter`, PEFT
    format) is logged beside it as run artifacts `<stage>-adapter/`, its base named in the tags
    (`adapter_base_version` = the parent version, or `base_model` when the parent is model.base), so
    multi-adapter servers (vLLM `--enable-lora`, LoRAX) can load many fine-tunes over one base
    (docs/serving.md). The registered model itself is
    the merged one: MLflow's transformers flavor records only a hub reference for a PEFT base.
    """
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stagewise import serving

    model = resaveable(AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    # MLflow records this as the model's name and serves it as the chat reply's "model": the
    # registered name, not the training machine's folder.
    model.name_or_path = registered_name
    active = mlflow.active_run()
    same = active is not None and active.info.run_id == run_id
    with contextlib.nullcontext() if same else mlflow.start_run(run_id=run_id):
        # mlflow.transformers.log_model's own path (Model.log) with stagewise.serving as the flavour
        # module: the same transformers flavour, and a pyfunc flavour that serves tool calls.
        info = mlflow.models.Model.log(
            artifact_path=None,
            flavor=serving,
            flavor_name=serving.FLAVOR_NAME,
            transformers_model={"model": model, "tokenizer": tok},
            name=stage,
            # OpenAI-style chat in and out; MLflow applies the tokenizer's chat template and generation
            # stops at its eos token (our end-of-turn token).
            task=CHAT_TASK,
            # mlflow would infer torchvision etc.; state what the model actually needs.
            pip_requirements=["torch", "transformers", "safetensors", "tokenizers"],
            registered_model_name=registered_name,
        )
        adapter = Path(model_dir) / ADAPTER_DIR
        adapter_tags = {}
        if (adapter / "adapter_config.json").exists():
            mlflow.log_artifacts(str(adapter), artifact_path=f"{stage}-adapter")
            adapter_tags = {"adapter_uri": f"runs:/{run_id}/{stage}-adapter", "adapter_format": "peft",
                            "adapter_base_version": lineage.get("parent_version") or "none",
                            "adapter_peft": _stage_info(model_dir).get("peft", "lora")}
    version = str(info.registered_model_version)
    c = client()
    for key, value in {**lineage, **adapter_tags}.items():
        if value is not None:
            c.set_model_version_tag(registered_name, version, key, str(value))
    c.set_model_version_tag(registered_name, version, "stage", stage)
    return version


def _stage_info(model_dir: Path) -> dict:
    import json

    f = Path(model_dir) / "stage_info.json"
    try:
        return json.loads(f.read_text()) if f.exists() else {}
    except ValueError:
        return {}


def find_cached_version(registered_name: str, stage: str, cache_key: str) -> dict | None:
    """A registered version of `stage` built from exactly these inputs, if any (newest first)."""
    from mlflow.exceptions import MlflowException

    check_name(registered_name)
    check_name(cache_key, "cache key")
    try:
        versions = client().search_model_versions(f"name='{registered_name}' and tag.cache_key='{cache_key}'")
    except MlflowException:
        return None
    hits = [v for v in versions if v.tags.get("stage") == stage]
    if not hits:
        return None
    v = max(hits, key=lambda v: int(v.version))
    return {"version": str(v.version), "tags": dict(v.tags), "run_id": v.run_id, "source": v.source}


def alias_version(registered_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(registered_name, alias).version)
    except MlflowException:
        return None


def version_tags(registered_name: str, version: str) -> dict[str, str]:
    return dict(client().get_model_version(registered_name, version).tags)


def set_challenger(registered_name: str, version: str) -> None:
    client().set_registered_model_alias(registered_name, CHALLENGER, version)


def promote(registered_name: str, version: str, gate_passed: bool, force_reason: str | None = None) -> bool:
    """Move `champion` to `version` if its gate passed (or a forced promotion has a reason).

    Under the registry lock: two promotions never interleave. The previous champion keeps
    `previous-champion`. A forced promotion keeps the version's gate verdict (`gate: failed` stays)
    and adds `forced: true` + `forced_reason`. Returns whether the alias moved.
    """
    return promote_seen(registered_name, version, gate_passed, force_reason)[0]


def promote_seen(registered_name: str, version: str, gate_passed: bool,
                 force_reason: str | None = None) -> tuple[bool, str | None]:
    """promote(), also returning the champion it found under the lock (what the caller reports)."""
    c = client()
    with registry_lock():
        current = alias_version(registered_name, CHAMPION)
        if not gate_passed and not force_reason:
            c.set_model_version_tag(registered_name, version, "gate", "failed")
            return False, current
        if gate_passed:
            c.set_model_version_tag(registered_name, version, "gate", "passed")
        if force_reason:
            c.set_model_version_tag(registered_name, version, "forced", "true")
            c.set_model_version_tag(registered_name, version, "forced_reason", force_reason)
        if current == str(version):
            return True, current
        if current is not None:
            c.set_registered_model_alias(registered_name, PREVIOUS, current)
        c.set_registered_model_alias(registered_name, CHAMPION, str(version))
        return True, current


def rollback(registered_name: str) -> str:
    """Champion back to the previous champion; returns the version now champion."""
    c = client()
    with registry_lock():
        prev = alias_version(registered_name, PREVIOUS)
        if prev is None:
            raise RuntimeError(f"model {registered_name!r} has no '{PREVIOUS}' alias: nothing to roll back to")
        current = alias_version(registered_name, CHAMPION)
        c.set_registered_model_alias(registered_name, CHAMPION, prev)
        if current is not None:
            c.set_registered_model_alias(registered_name, PREVIOUS, current)
            c.set_model_version_tag(registered_name, current, "rolled_back", "true")
        return prev


def download_model(registered_name: str, version: str, dest: Path) -> Path:
    """Materialize a registered version as a plain HF folder (model + tokenizer) at `dest`."""
    import mlflow

    comps = mlflow.transformers.load_model(f"models:/{registered_name}/{version}", return_type="components")
    tmp = dest.with_name(dest.name + ".tmp")
    resaveable(comps["model"]).save_pretrained(tmp, safe_serialization=True)
    comps["tokenizer"].save_pretrained(tmp)
    _replace_dir(tmp, dest)
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
