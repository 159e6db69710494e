"""Run bookkeeping around the DAG: start (config, stores, parent MLflow run), finish (summary).

Plain functions; flows/pipeline.py calls them through the thin tasks at the bottom.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from stagewise.config import Config, load_config
from stagewise.stage import RunContext
from stagewise.workspace import Workspace

log = logging.getLogger("stagewise")

TRAIN_STAGES = ("pretrain", "sft", "preference", "reasoning")
DATA_STEPS = ("generate", "ingest", "quality", "dedup", "decontaminate", "validate", "tokenizer")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def start_run(root: Path, config_path: Path, profile: str | None, overrides: list[str],
              force: bool, force_stages: list[str], run_id: str | None = None) -> tuple[RunContext, Config]:
    """Resolve the config, prepare the stores, open the pipeline's parent MLflow run."""
    import mlflow

    from stagewise import dvcops, registry
    from stagewise.hashing import git_commit

    cfg = load_config(config_path, profile, overrides)
    ws = Workspace.at(root)
    run_id = run_id or new_run_id()
    # dvc.yaml reads stage params from here, so `dvc status` compares against what actually ran.
    resolved = cfg.to_dict()
    tmp = ws.resolved_params.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(ws.resolved_params)
    run_dir = ws.reports / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    dvcops.ensure_repo(ws.root)
    registry.setup_tracking(ws.root)
    code = git_commit()
    # Created through the client so it stays RUNNING while stages (in any thread) nest under it by id.
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(registry.EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=f"pipeline-{run_id}", tags={
        "pipeline_run": run_id, "profile": profile or "", "code_version": code,
        "prefect_flow_run_id": _prefect_flow_run_id() or "",
        "reports_dir": str(run_dir),
    })
    client.log_param(run.info.run_id, "profile", profile or "")
    client.log_param(run.info.run_id, "overrides", " ".join(overrides) or "-")
    client.log_artifact(run.info.run_id, str(run_dir / "config.yaml"))
    ctx = RunContext(run_id=run_id, root=ws.root, mlflow_run_id=run.info.run_id,
                     registered_model=cfg.run.registered_model, code_version=code,
                     force=force, force_stages=list(force_stages))
    return ctx, cfg


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a flow there is simply no id
        return None


def finish_run(ctx: RunContext, summary: dict[str, Any], status: str = "FINISHED") -> Path:
    """Write reports/<run_id>/summary.json (+ reports/latest/), close the MLflow parent run."""
    import mlflow

    run_dir = ctx.ws.reports / ctx.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)
    latest = ctx.ws.reports / "latest"
    tmp_latest = ctx.ws.reports / f".latest-{ctx.run_id}"
    shutil.copytree(run_dir, tmp_latest, dirs_exist_ok=True)
    if latest.exists():
        shutil.rmtree(latest)
    tmp_latest.rename(latest)
    if ctx.mlflow_run_id:
        client = mlflow.MlflowClient()
        client.log_artifacts(ctx.mlflow_run_id, str(run_dir), artifact_path="report")
        if summary.get("gate"):
            client.set_tag(ctx.mlflow_run_id, "gate", "passed" if summary["gate"].get("passed") else "failed")
        client.set_terminated(ctx.mlflow_run_id, status)
    return path


def fail_run(ctx: RunContext) -> None:
    from mlflow import MlflowClient

    if ctx.mlflow_run_id:
        MlflowClient().set_terminated(ctx.mlflow_run_id, "FAILED")


def env_defaults(root: Path) -> None:
    """Quiet, offline, project-local defaults (users can still override each one)."""
    for k, v in {
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }.items():
        os.environ.setdefault(k, v)
