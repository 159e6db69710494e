"""What every training stage does around its recipe: cache, track, evaluate, register.

A stage's Prefect task is one line, `run_stage(ctx, step("sft"), sft, ...)`. The recipe (`tasks/sft.py:sft`)
stays a plain function that knows nothing of MLflow or Prefect; this module owns the bookkeeping so
that it is identical for every stage:

1. cache key = hash(the sections the step declares it reads, data hash, parent's cache key and
   weights hash, the source of every project module the step imports); a registered version with
   that key is reused (its folder materialized if missing);
2. otherwise an MLflow run `<stage>` nested under the pipeline run records params, training
   curves (`report_to="mlflow"`), the evaluation of child *and* parent, and the model version;
3. a stage that raises registers nothing (its MLflow run is marked FAILED).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stagewise.config import Config, StepConfig, hash_obj, recipe_dump
from stagewise.rulebook import Rulebook, describe, significant
from stagewise.steps import Step
from stagewise.workspace import Workspace

log = logging.getLogger("stagewise")

@dataclass
class RunContext:
    """Identity of one pipeline run, passed to every stage task."""

    run_id: str                      # reports/<run_id>/
    root: Path                       # workspace root
    mlflow_run_id: str | None        # parent MLflow run
    registered_model: str
    code_version: str
    force: bool = False
    force_stages: list[str] = field(default_factory=list)
    # steps that build on the previous one's weights, in pipeline order: forcing one forces the rest
    weight_chain: tuple[str, ...] = ()

    @property
    def ws(self) -> Workspace:
        return Workspace.at(self.root)

    def forced(self, stage: str) -> bool:
        """Does `stage` bypass its caches? `--force`, `--force-stage stage`, or a forced stage upstream.

        A forced stage retrains and registers new weights; reusing a downstream model trained on the
        old ones would ship a chain that was never trained together, so the force cascades.
        """
        if self.force or stage in self.force_stages:
            return True
        if stage not in self.weight_chain:
            return False
        return any(s in self.force_stages for s in self.weight_chain[:self.weight_chain.index(stage)])


@dataclass
class Lineage:
    """What a stage's model was made from; becomes tags on its model version."""

    stage: str
    model_dir: str
    cache_key: str
    version: str | None = None       # registered model version (None for the untrained init)
    data_hash: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    parent_metrics: dict[str, Any] = field(default_factory=dict)
    weights_hash: str | None = None  # dir_hash of the *.safetensors: what children are trained on


TrainFn = Callable[..., dict]


def cache_key(step: Step, cfg: Config, parent: Lineage | None, data_hash: str | None, code: str) -> str:
    return hash_obj({
        "stage": step.name,
        "config": config_part(step, cfg),
        "parent": parent.cache_key if parent else None,
        # The parent's key says what it was trained from, its weights what it became: a re-trained
        # parent (--force-stage, a resume) is a new parent even under the same key.
        "parent_weights": parent.weights_hash if parent else None,
        "data": data_hash,
        "code": code,
    })


def config_part(step: Step, cfg: Config) -> dict[str, Any]:
    """The settings a step's result depends on: the sections it declares, and the run's seed."""
    full = cfg.unrestricted()
    return {"run.seed": full.run.seed, **{s: recipe_dump(full.section(s)) for s in step.reads}}


def stage_key(step: Step, cfg: Config, parent: Lineage | None, data_hash: str | None) -> str:
    """The content key `run_stage` caches `step` under: declared sections + parent + data + code closure."""
    return cache_key(step, cfg, parent, data_hash, step.code_version())


def init_key(cfg: Config, tokenizer_hash: str | None) -> str:
    """The key of the random init (`models/init/cache_key`): its `model:` section, the seed, the tokenizer."""
    return hash_obj({"model": cfg.model.model_dump(mode="json"), "seed": cfg.run.seed, "tokenizer": tokenizer_hash})


def compress_key(step: Step, cfg: Config, parent: Lineage, eval_sets: dict[str, dict]) -> str:
    """The key the compress step caches under (`models/compress/cache_key`): its stage key on the final
    trained model, and the contents of the eval sets its candidates are judged on (`EvalPlan.describe()`)."""
    return hash_obj({"step": stage_key(step, cfg, parent, parent.data_hash),
                     "eval_sets": {n: d["data_hash"] for n, d in eval_sets.items()}})


def claim_checkpoints(out_dir: Path, key: str) -> bool:
    """Keep `models/<stage>.checkpoints/` for a resume only if a killed run of *these inputs* wrote it.

    The stages resume from the newest checkpoint they find; one left by a run with other params,
    data or parent would silently mix two trainings. Returns True when checkpoints were kept.
    """
    import shutil

    from stagewise.modeling import checkpoint_dir

    ckpt = checkpoint_dir(out_dir)
    marker = ckpt / "cache_key"
    kept = ckpt.is_dir() and marker.is_file() and marker.read_text().strip() == key
    if ckpt.exists() and not kept:
        log.warning("%s: discarding checkpoints of a run with other inputs (%s)", Path(out_dir).name, ckpt)
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    # HF writes checkpoint-N in place, trainer_state.json last: without a readable one the kill came
    # mid-save, and resuming from it would crash (or worse). The previous checkpoint is still there.
    for d in ckpt.glob("checkpoint-*"):
        try:
            json.loads((d / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("%s: discarding half-written %s", Path(out_dir).name, d.name)
            shutil.rmtree(d, ignore_errors=True)
    return kept and any(ckpt.glob("checkpoint-*"))


def prefect_result_storage(uri: str | None) -> str | None:
    """The Prefect storage block (its slug) the stages persist their results into: `ops.result_storage`,
    or None for Prefect's default (PREFECT_HOME on this host, unreadable from any other).

    Prefect's own `RemoteFileSystem` block (fsspec; s3fs for `s3://`), saved on the API server this run
    talks to: Prefect takes only saved blocks as `result_storage`. It holds the base path and nothing
    else: s3fs reads the endpoint and the keys from the process's `AWS_*` variables (as datatrove and
    dvc-s3 do), so no credential lands in Prefect's database. prefect-aws' S3Bucket would add a package
    and an AwsCredentials block for the same reads. Named by the URI's hash: runs with different stores
    on one shared server never overwrite each other's block.
    """
    if not uri:
        return None
    import hashlib

    from prefect.filesystems import RemoteFileSystem

    name = f"stagewise-results-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    RemoteFileSystem(basepath=uri).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def cached_task_options(cache_key_fn: Callable[[Any, dict[str, Any]], str | None],
                        result_storage: str | None) -> dict[str, Any]:
    """`Task.with_options` of a task Prefect replays by key: its result persisted as JSON (nothing
    from disk is unpickled) into `result_storage` (prefect_result_storage), where every host that
    computes the same key reads it back as a Cached state."""
    return dict(cache_key_fn=cache_key_fn, persist_result=True, result_serializer="json",
                result_storage=result_storage)


def prefect_cache_key(step: Step) -> Callable[[Any, dict[str, Any]], str | None]:
    """Prefect `cache_key_fn` of a stage task `(ctx, cfg, parent, data_hash, cache_only)`.

    The registry stays the source of truth: a key is returned only while a registered version built
    from exactly these inputs exists *and* models/<stage>/ holds its weights, so Prefect can only
    ever replay a result whose model is really there. The key carries the version: a re-registered
    model is a new key. Forced stages get no key (they run, and their result is not cached).
    Cold runs get no key either, so Prefect only memoizes cache *hits* (rows that say cached=True).
    """
    def key_fn(task_ctx: Any, params: dict[str, Any]) -> str | None:
        from stagewise import registry
        from stagewise.hashing import dir_hash

        ctx = params["ctx"]
        if ctx.forced(step.name):
            return None
        key = stage_key(step, params["cfg"], params["parent"], params.get("data_hash"))
        hit = registry.find_cached_version(ctx.registered_model, step.name, key)
        out_dir = ctx.ws.model_dir(step.name)
        if hit is None or not out_dir.is_dir() or dir_hash(out_dir, "*.safetensors") != hit["tags"].get("weights_hash"):
            return None
        # the replayed row carries the rulebook's verdict: new gate settings or another chain re-decide
        rules = hash_obj({"gate": params["cfg"].gate.model_dump(mode="json"),
                          "accepted": [x.weights_hash for x in params.get("accepted") or []]})
        return f"stagewise-{step.name}-{key}-v{hit['version']}-r{rules[:12]}"

    return key_fn


def flat_params(prefix: str, obj: Any) -> dict[str, Any]:
    """A config section as MLflow params, credentials in any URI value redacted (a source or base URI
    may carry user:password@)."""
    from stagewise.redact import redact

    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_params(f"{prefix}.{k}" if prefix else str(k), v))
    else:
        value = obj if not isinstance(obj, list) else ",".join(map(str, obj))
        out[prefix] = redact(value) if isinstance(value, str) else value
    return out


def numeric_metrics(evals: dict) -> dict[str, float]:
    """{task: {metric: v}} → {"task.metric": v} for MLflow (numbers only)."""
    out = {}
    for task, metrics in evals.items():
        for m, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{task}.{m}".replace(",", "_")] = float(v)
    return out


def stage_evals(stage: str, cfg: Config, root: Path) -> list[str]:
    """The stage's target eval, its context evals and every general eval (the forgetting guard's view)."""
    from stagewise.evalsets import plan

    return plan(cfg, root).stage_tasks(stage)


def eval_tasks_dir(cfg: Config, root: Path) -> Path:
    """The compiled lm-eval YAMLs of the run's declared (or demo, or held-out) evaluation sets."""
    from stagewise.evalsets import compiled_dir, plan

    return compiled_dir(plan(cfg, root), root)


def fine_tuning_base(lineage: list[Lineage]) -> tuple[Lineage, dict] | None:
    """The model fine-tuning started from (pretrain output, or model.base) and its scores, for the last
    model of `lineage` (the candidate).

    None when that model is the candidate's parent (the parent rules already cover it) or the
    candidate itself. Its scores are those its first child's run measured on it as a parent: every
    stage's evals include all general evals, so they are on the same items as the candidate's.
    """
    stages = [x.stage for x in lineage]
    root = stages.index("pretrain") if "pretrain" in stages else 0
    if root >= len(lineage) - 2:
        return None
    return lineage[root], lineage[root + 1].parent_metrics


def run_stage(ctx: RunContext, step: Step, train: TrainFn, cfg: Config, parent: Lineage,
              data_hash: str | None, cache_only: bool = False,
              accepted: list[Lineage] | None = None) -> tuple[Lineage, dict]:
    """Cache-or-train one stage; returns its lineage and its summary row.

    The recipe sees the config restricted to the step's declared sections (`step.reads`): reading
    any other section raises, so the cache key cannot miss a setting the model depends on.
    `accepted`: the chain so far (the starting model, then every accepted stage; its last is `parent`):
    the rulebook judges the child against the parent, the fine-tuning base and the earlier targets.
    """
    stage = step.name
    data_dir = ctx.ws.curated
    import functools

    import mlflow

    from stagewise import registry
    from stagewise.evalsets import plan
    from stagewise.hashing import dir_hash
    from stagewise.evaluation import evaluate

    ws = ctx.ws
    evals = plan(cfg, ws.root)
    eval_tasks = evals.stage_tasks(stage)
    evaluate = functools.partial(evaluate, tasks_dir=eval_tasks_dir(cfg, ws.root))
    used_sets = evals.describe(evals.sets_of_tasks(eval_tasks))
    out_dir = ws.model_dir(stage)
    key = stage_key(step, cfg, parent, data_hash)
    t0 = time.time()
    row: dict[str, Any] = {"name": stage, "parent_version": parent.version, "cached": False}

    # The parent is scored on the child's evals (cached per weights hash): the baseline of every delta.
    parent_metrics = evaluate(Path(parent.model_dir), eval_tasks, ws, cfg.evaluate)
    hit = None if ctx.forced(stage) else registry.find_cached_version(ctx.registered_model, stage, key)
    if hit is None and cache_only:
        # what `dvc repro <stage>` does with a missing upstream output: make it first, and say so
        log.warning("running %s first: the selected stages after it train on its model, and no registered "
                    "%s version matches its inputs", stage, stage)
    if hit is not None:
        if not out_dir.exists() or dir_hash(out_dir, "*.safetensors") != hit["tags"].get("weights_hash"):
            registry.download_model(ctx.registered_model, hit["version"], out_dir)
        log.info("%s: inputs unchanged, reusing model version %s", stage, hit["version"])
        child_metrics = evaluate(out_dir, eval_tasks, ws, cfg.evaluate)
        row.update(cached=True, model_version=hit["version"])
        lineage = Lineage(stage, str(out_dir), key, hit["version"], data_hash, child_metrics,
                          weights_hash=hit["tags"].get("weights_hash"))
    else:
        with mlflow.start_run(run_name=stage, nested=ctx.mlflow_run_id is not None,
                              parent_run_id=ctx.mlflow_run_id) as run:
            mlflow.set_tags({"stage": stage, "pipeline_run": ctx.run_id, "code_version": ctx.code_version})
            params = {}
            for s in step.reads:
                params.update(flat_params(s, cfg.section(s).model_dump(mode="json")))
            mlflow.log_params(params)
            # the sets behind every number this run logs: path, kind, origin, items, content hash
            mlflow.log_params({f"eval_set.{n}": f"{d['kind']} {d['origin']} {d['items']} items "
                               f"{d['data_hash']} {d['path']}"[:500] for n, d in used_sets.items()})
            claim_checkpoints(out_dir, key)
            result = train(StepConfig(cfg, step.name, step.reads), Path(parent.model_dir), data_dir, out_dir,
                           report_to="mlflow")
            extras = {k: v for k, v in (result.get("train_metrics") or {}).items() if isinstance(v, (int, float))}
            mlflow.log_metrics({f"train.{k}": float(v) for k, v in extras.items()})
            child_metrics = evaluate(out_dir, eval_tasks, ws, cfg.evaluate)
            weights = dir_hash(out_dir, "*.safetensors")
            mlflow.log_metrics(numeric_metrics(child_metrics))
            mlflow.log_metrics({f"parent.{k}": v for k, v in numeric_metrics(parent_metrics).items()})
            version = registry.log_model_version(
                out_dir, ctx.registered_model, stage,
                lineage={
                    "parent_version": parent.version or "none",
                    "base_model": registry.base_model_tag(cfg.model.base),
                    "data_hash": data_hash,
                    "config_hash": hash_obj(config_part(step, cfg)),
                    "code_version": ctx.code_version,
                    "cache_key": key,
                    "pipeline_run": ctx.run_id,
                    "weights_hash": weights,
                    "mlflow_run_id": run.info.run_id,
                },
                run_id=run.info.run_id,
                trust_remote_code=cfg.model.trust_remote_code,
            )
            row.update(model_version=version, steps=result.get("steps"),
                       resumed_from_step=result.get("resumed_from_step"),
                       **{k: result[k] for k in ("stopped_early", "warm_start") if result.get(k) is not None})
            lineage = Lineage(stage, str(out_dir), key, version, data_hash, child_metrics, weights_hash=weights)
    lineage.parent_metrics = parent_metrics
    row.update(target_row(stage, child_metrics, parent_metrics, evals))
    context_cis(cfg, evals, stage, row, child_metrics, parent_metrics)
    row["eval_sets"] = used_sets
    verdict = judge_child(cfg, evals, lineage, accepted or [parent])
    target_rule = next((r for r in verdict.rules if r["rule"] == "target_improves"), None)
    row["significant"] = significant(target_rule)
    row.update(ci_width_note(target_rule, child_metrics))
    failed = verdict.failed()
    row["rules"] = {"passed": verdict.passed, "enforced": sum(r["enforced"] for r in verdict.rules),
                    "failed": [describe(r) for r in failed]}
    # A parent to fall back to: a registered stage model, or the pretrained `model.base` a first stage started
    # from (a user's real base is a model worth keeping; the random init pretraining starts from is not).
    if failed and cfg.train.keep_parent_on_regression and (parent.version is not None or parent.stage == "base"):
        row["kept_parent"] = (f"{describe(failed[0])}"
                              + (f" (+{len(failed) - 1} more rule(s))" if len(failed) > 1 else "")
                              + f": version {row.get('model_version')} is registered as a rejected candidate and "
                              f"the next stage trains on the parent's weights "
                              f"({f'version {parent.version}' if parent.version else 'model.base'}); "
                              "train.keep_parent_on_regression")
        log.warning("%s: %s", stage, row["kept_parent"])
        if row.get("model_version"):
            registry.client().set_model_version_tag(ctx.registered_model, row["model_version"], "rejected",
                                                    row["kept_parent"][:500])
    row["seconds"] = round(time.time() - t0, 1)
    return lineage, row


def context_cis(cfg: Config, evals, stage: str, row: dict, child: dict, parent: dict) -> None:
    """Each number scored beside the target gets the CI of its change, the rulebook's paired bootstrap over
    the set's items (`ci_low`, `ci_high` in `unit`): an also-line says whether a change is outside noise."""
    from stagewise.rulebook import bootstrap_delta_ci, unit_of

    for c in evals.context(stage):
        v = (row.get("context") or {}).get(c.label)
        if v is None or c.task not in child or c.task not in parent:
            continue
        unit = unit_of(c.metric, c.higher_is_better)
        lo, hi, paired = bootstrap_delta_ci(c.metric, unit, child[c.task], parent[c.task],
                                            cfg.evaluate.bootstrap_iters, cfg.gate.confidence, seed=cfg.run.seed)
        if lo is not None:
            v.update(ci_low=lo, ci_high=hi, unit=unit, paired=paired, confidence=cfg.gate.confidence)


def ci_width_note(rule: dict | None, child: dict, points: float = 5.0) -> dict[str, Any]:
    """How precise a proportion target's verdict is: a CI wider than ±`points` says how many items would
    make it ±`points` (the half-width shrinks with 1/√n)."""
    import math

    if not rule or rule.get("ci_low") is None or rule.get("unit") != "points":
        return {}
    half = (rule["ci_high"] - rule["ci_low"]) / 2
    task, metric = rule["metric"].rsplit(".", 1)
    n = len((child.get(task) or {}).get("samples", {}).get(metric) or [])
    if half <= points or n == 0:
        return {"ci_half_width": round(half, 2)}
    need = math.ceil(n * (half / points) ** 2)
    return {"ci_half_width": round(half, 2),
            "ci_note": f"95% CI of the gain ±{half:.1f} points at {n} items: ~{need} items would make it ±{points:g}"}


def judge_child(cfg: Config, evals, child: Lineage, accepted: list[Lineage]):
    """The rulebook on a trained child: its target vs the parent, the general rules vs the parent and
    the fine-tuning base, and every earlier accepted stage's target (stagewise/rulebook.py)."""
    book = Rulebook.of(cfg, evals)
    base = fine_tuning_base([*accepted, child])
    return book.judge(child.stage, child.metrics, parent=child.parent_metrics, base=base[1] if base else None,
                      guards=book.guards_for(child.stage, accepted[1:]))


def target_row(stage: str, child: dict, parent: dict, evals) -> dict[str, Any]:
    """The stage's target metric vs its parent, and every general metric vs its parent (`evals`: the
    run's stagewise.evalsets.EvalPlan)."""
    general = {
        g.label: {"value": child.get(g.task, {}).get(g.metric), "baseline": parent.get(g.task, {}).get(g.metric),
                  "higher_is_better": g.higher_is_better, "set": g.set}
        for g in evals.general
    }
    context = {   # scored beside the target, never a rule (e.g. SFT's open-book numbers on rag sets)
        c.label: {"value": child.get(c.task, {}).get(c.metric), "baseline": parent.get(c.task, {}).get(c.metric),
                  "higher_is_better": c.higher_is_better, "set": c.set}
        for c in evals.context(stage)
    }
    t = evals.targets.get(stage)
    if t is None:
        return {"target_metric": None, "value": None, "baseline_value": None, "higher_is_better": None,
                "improved": None, "general": general}
    value = child.get(t.task, {}).get(t.metric)
    base = parent.get(t.task, {}).get(t.metric)
    improved = None if value is None or base is None else (value > base if t.higher_is_better else value < base)
    return {"target_metric": t.label, "target_set": t.set, "value": value, "baseline_value": base,
            "higher_is_better": t.higher_is_better, "improved": improved, "general": general,
            **({"context": context} if context else {})}
