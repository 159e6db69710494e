"""The Stagewise DAG, wiring only: data → train → compress → gate.

    stagewise run --profile demo            # CLI
    from flows.pipeline import pipeline; pipeline(profile="smoke")   # Python

Each phase is a subflow; each step is a Prefect task named after the step (tasks/<step>.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

import tasks
from stagewise.config import Config
from stagewise.stage import Lineage, RunContext, cached_task_options, prefect_cache_key, prefect_result_storage


# ------------------------------------------------------------------ run bookkeeping tasks
@task(name="start-run")
def start_run_task(root: Path, config_path: Path, profile: str | None, overrides: list[str],
                   force: bool, force_stages: list[str], run_id: str | None = None) -> tuple[RunContext, Config]:
    """Resolve the config, prepare MLflow/DVC stores, open the parent MLflow run."""
    from stagewise.run import start_run

    chain = tuple(s.name for s in tasks.STEPS if s.kind == "train") + ("compress",)
    return start_run(root, config_path, profile, overrides, force, force_stages, run_id=run_id, weight_chain=chain)


@task(name="dvc-status")
def dvc_current_task(root: Path, step: str) -> bool:
    """Is this DVC stage up to date (deps, params, outs unchanged)?"""
    from stagewise import dvcops

    return dvcops.is_current(root, step)


@task(name="dvc-status-all")
def dvc_stale_task(root: Path) -> list[str]:
    """The DVC stages that are not up to date, from one `dvc status` of the whole pipeline."""
    from stagewise import dvcops

    return sorted(dvcops.stale_stages(root))


@task(name="dvc-commit", retries=2, retry_delay_seconds=2)
def dvc_commit_task(root: Path, step: str, stats: dict) -> str | None:
    """Record the step's outputs in dvc.lock; return their md5 (the data hash in lineage)."""
    from stagewise import dvcops
    from stagewise.steps import metrics_path
    from stagewise.workspace import Workspace

    return dvcops.commit(root, step, stats, metrics_path(Workspace.at(root), step))


@task(name="gate-report", retries=1)
def gate_report_task(ctx: RunContext, summary: dict[str, Any]) -> list[str]:
    """Write reports/<run_id>/gate.md + gate.html and publish the Markdown as a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    from stagewise.report import write_gate_report

    md, html = write_gate_report(ctx.ws.reports / ctx.run_id, summary)
    create_markdown_artifact(markdown=md.read_text(), key="gate-report",
                             description=f"Stagewise gate report, run {ctx.run_id}")
    return [str(md), str(html)]


@task(name="recipe")
def recipe_task(ctx: RunContext, cfg: Config, parent: Lineage) -> Config:
    """`auto` training settings → numbers from the curated data and the starting model (stagewise/recipes.py)."""
    from stagewise.run import resolve_recipes

    return resolve_recipes(ctx, cfg, Path(parent.model_dir))


@task(name="track-data-step", retries=1)
def track_data_step_task(ctx: RunContext, step: str, stats: dict, out_dir: Path | None) -> None:
    """Counts per reason as MLflow metrics of a nested run `<step>`; Data Docs as its artifacts."""
    from stagewise.run import log_data_step

    log_data_step(ctx, step, stats, out_dir)


@task(name="curation-funnel")
def curation_artifact_task(stats: dict[str, dict]) -> None:
    """Publish the curation funnel (input → kept per step and kind) as a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    from stagewise.summary import curation_funnel, removed_counts

    create_table_artifact(table=curation_funnel(stats), key="curation-funnel",
                          description="Records in and kept per curation step; removed by reason: "
                          + ", ".join(f"{k}={v}" for k, v in sorted(removed_counts(stats).items())))


@task(name="data-report")
def data_report_task(cfg: Config, ctx: RunContext, stats: dict[str, dict]) -> dict[str, Any]:
    """Loud numbers (steps that removed most of a kind), the eval sets and the input hashes, for the summary."""
    import logging

    from stagewise.evalsets import plan
    from stagewise.hashing import input_hashes
    from stagewise.summary import removal_warnings

    warnings = removal_warnings(stats, cfg.data.warn_removed_share)
    for w in warnings:
        logging.getLogger("stagewise").warning(w["message"])
    evals = plan(cfg, ctx.root)
    return {"warnings": warnings, "eval_sets": evals.describe(), "eval_notes": evals.notes,
            "inputs": input_hashes(cfg, ctx.root)}


@task(name="publish-summary")
def publish_summary_task(summary: dict[str, Any]) -> None:
    """Publish the run summary as a Prefect Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from stagewise.summary import summary_markdown

    create_markdown_artifact(markdown=summary_markdown(summary), key="run-summary",
                             description=f"Stagewise run {summary['run_id']}")


@task(name="remember-if-cached")
def remember_task(ctx: RunContext, requested: Config, cfg: Config, trained: dict[str, Any], summary: dict[str, Any],
                  explicit: bool) -> bool:
    """A fully cached run is recorded, so the next unchanged `stagewise run` can say so without running."""
    import logging

    from stagewise.rerun import forget, remember

    try:
        return remember(ctx.root, requested, cfg, trained.get("lineage") or [], summary, explicit)
    except Exception as e:  # noqa: BLE001 - the run itself is done: no record only means the next one runs
        forget(ctx.root)
        logging.getLogger("stagewise").warning("not recorded as up to date (%s: %s): the next run runs the flow",
                                               type(e).__name__, e)
        return False


@task(name="finish-run", retries=1)
def finish_run_task(ctx: RunContext, summary: dict[str, Any], cfg: Config | None = None) -> str:
    """Write reports/<run_id>/summary.json and close the MLflow parent run."""
    from stagewise.run import finish_run

    return str(finish_run(ctx, summary, cfg=cfg))


# ------------------------------------------------------------------ phases
@flow(name="data")
def data_phase(cfg: Config, ctx: RunContext, selected: list[str]) -> dict[str, Any]:
    """Raw text → curated, validated, DVC-tracked datasets and a tokenizer."""
    import json

    from stagewise.hashing import dvc_out_hash

    ws = ctx.ws
    out: dict[str, Any] = {"stats": {}, "cached": [], "hashes": {}}
    # One status for all steps; once a step re-ran, the steps after it are asked again (their deps moved).
    stale, ran = set(dvc_stale_task(ctx.root)), False

    def current(step: str) -> bool:
        return dvc_current_task(ctx.root, step) if ran else step not in stale

    for data_step in tasks.of_kind("data"):
        step, step_task, kwargs = data_step.name, tasks.prefect_task(data_step.name), data_step.args(cfg, ws)
        if step == "generate" and cfg.data.sources:
            continue  # user data: nothing to generate
        stats_file = kwargs.get("out_dir", Path()) / "stats.json"
        if step not in selected or (not ctx.forced(step) and current(step)):
            out["cached"].append(step)
            out["stats"][step] = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        else:  # submitted: runs on the phase's task runner (sharded steps then fan out over Ray)
            out["stats"][step] = step_task.submit(**kwargs).result()
            ran = True
            dvc_commit_task(ctx.root, step, out["stats"][step])
            track_data_step_task(ctx, step, out["stats"][step], kwargs.get("out_dir"))
        out["hashes"][step] = dvc_out_hash(ctx.root, step)
    curation_artifact_task(out["stats"])
    out.update(data_report_task(cfg, ctx, out["stats"]))
    return out


@flow(name="train")
def train_phase(cfg: Config, ctx: RunContext, data: dict[str, Any], selected: list[str]) -> dict[str, Any]:
    """Init (or base) model → pretrain → sft → preference → reasoning, one model version each."""
    from stagewise.hashing import training_data_hash
    from tasks.base import base_task

    train_steps = [s.name for s in tasks.of_kind("train")]
    last = max((train_steps.index(s) for s in selected if s in train_steps), default=-1)
    if last < 0:
        return {"lineage": [], "rows": [], "cfg": cfg}
    parent: Lineage = base_task(cfg, ctx, data["hashes"].get("tokenizer"))
    cfg = recipe_task(ctx, cfg, parent)   # the stages (and their cache keys) see numbers, never `auto`
    lineage, rows = [parent], []
    storage = prefect_result_storage(cfg.ops.result_storage)   # None: PREFECT_HOME on this host
    for stage in train_steps[: last + 1]:
        if stage == "pretrain" and cfg.model.base:
            continue  # a given base model replaces pretraining
        # Prefect's cache keyed by the stage's content key, valid only while its model version exists.
        stage_task = tasks.prefect_task(stage).with_options(
            **cached_task_options(prefect_cache_key(tasks.step(stage)), storage))
        child, row = stage_task(ctx, cfg, parent, training_data_hash(data["hashes"]),
                                cache_only=stage not in selected, accepted=list(lineage))
        rows.append(row)
        if row.get("kept_parent"):
            continue   # failed the rulebook: registered as rejected, the chain goes on from the parent
        lineage.append(child)
        parent = child
    return {"lineage": lineage, "rows": rows, "cfg": cfg}


@flow(name="compress")
def compress_phase(cfg: Config, ctx: RunContext, trained: dict[str, Any]) -> dict[str, Any]:
    """Compressed candidates of the final model, chosen on accuracy, size and latency together."""
    from tasks.compress import compress_task

    return compress_task(ctx, cfg, trained["lineage"])


@flow(name="gate")
def gate_phase(cfg: Config, ctx: RunContext, trained: dict[str, Any],
               compression: dict[str, Any] | None = None) -> dict[str, Any]:
    """Forgetting guard on the model that ships (compressed when one qualified); challenger always,
    champion only on a pass."""
    from tasks.gate import gate_task

    return gate_task(ctx, cfg, trained["lineage"], compression)


# ------------------------------------------------------------------ the pipeline
def _with_missing_upstream(cfg: Config, ctx: RunContext, selected: list[str]) -> list[str]:
    # `--stages pretrain` in a fresh workspace: the data steps making its missing inputs run first
    import logging

    from stagewise.steps import with_missing_upstream

    steps, notes = with_missing_upstream(tasks.STEPS, list(selected), ctx.ws,
                                         skip=(("generate",) if cfg.data.sources else ())
                                         + (("pretrain",) if cfg.model.base else ()))
    for note in notes:
        logging.getLogger("stagewise").warning(note)
    return steps


@flow(name="stagewise")
def pipeline(profile: str | None = "demo", stages: list[str] | None = None, overrides: list[str] | None = None,
             config_path: str = "params.yaml", workspace: str = ".", force: bool = False,
             force_stages: list[str] | None = None) -> dict[str, Any]:
    """Raw text to a promoted model: data → train → compress → gate → registry."""
    import time

    from stagewise.lock import run_lock
    from stagewise.run import data_task_runner, new_run_id
    from stagewise.summary import build_summary

    root = Path(workspace).resolve()
    run_id = new_run_id()
    # One run per workspace at a time (a second one waits, ops.lock_timeout): see stagewise/lock.py.
    with run_lock(root, root / config_path, profile, overrides or [], run_id):
        t0 = time.time()   # the run's own time, not the wait for the lock
        ctx, cfg = start_run_task(root, root / config_path, profile, overrides or [], force, force_stages or [],
                                  run_id=run_id)
        requested = cfg
        selected = _with_missing_upstream(cfg, ctx, stages or cfg.run.stages)
        try:
            data = data_phase.with_options(task_runner=data_task_runner())(cfg, ctx, selected)
            trained = train_phase(cfg, ctx, data, selected)
            cfg = trained.get("cfg", cfg)   # auto settings resolved (stagewise/recipes.py)
            # a candidate exists once one trained stage was kept (lineage[0] is the untrained init or model.base)
            candidate = len(trained["lineage"]) > 1
            compression = (compress_phase(cfg, ctx, trained)
                           if "compress" in selected and cfg.compress.methods and candidate else None)
            verdict = gate_phase(cfg, ctx, trained, compression) if "gate" in selected and candidate else None
        except BaseException as e:
            from stagewise.errors import is_interrupt
            from stagewise.run import fail_run

            fail_run(ctx, "KILLED" if is_interrupt(e) else "FAILED")
            raise
        summary = build_summary(ctx, profile, data, trained, verdict, compression, seconds=time.time() - t0)
        gate_report_task(ctx, summary)
        finish_run_task(ctx, summary, cfg)
        remember_task(ctx, requested, cfg, trained, summary, explicit=bool(stages or force or force_stages))
    publish_summary_task(summary)
    return summary
