"""Run bookkeeping around the DAG: start (config, stores, parent MLflow run), finish (summary).

Plain functions; flows/pipeline.py calls them through the thin tasks at the bottom.
"""

from __future__ import annotations

import contextlib
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

def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def start_run(root: Path, config_path: Path, profile: str | None, overrides: list[str],
              force: bool, force_stages: list[str], run_id: str | None = None,
              weight_chain: tuple[str, ...] = ()) -> tuple[RunContext, Config]:
    """Resolve the config, prepare the stores, open the pipeline's parent MLflow run.

    `weight_chain`: the steps that build on each other's weights (forcing one forces the rest)."""
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
    tracking_uri = registry.setup_tracking(ws.root)
    # Under the workspace lock: whatever an earlier run left half-done was left by a dead process.
    clean_crash_leftovers(ws)
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
                     force=force, force_stages=list(force_stages), weight_chain=tuple(weight_chain))
    mark_dead_runs(ws, keep=run.info.run_id)
    write_run_links(ctx, run_dir, tracking_uri, exp.experiment_id)
    return ctx, cfg


# ------------------------------------------------------------------ cross-links and crash hygiene
def write_run_links(ctx: RunContext, run_dir: Path, tracking_uri: str, experiment_id: str) -> dict[str, Any]:
    """reports/<run_id>/run.json: the ids that tie the Prefect flow run, the MLflow run and this folder.

    The MLflow parent run carries `prefect_flow_run_id` and `reports_dir` tags; the Prefect flow run
    gets a `run-links` artifact with the MLflow run and this folder.
    """
    links = {
        "run_id": ctx.run_id,
        "reports_dir": str(run_dir),
        "prefect_flow_run_id": _prefect_flow_run_id(),
        "prefect_api_url": os.environ.get("PREFECT_API_URL"),
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_experiment_id": experiment_id,
        "mlflow_run_id": ctx.mlflow_run_id,
        "code_version": ctx.code_version,
        "pid": os.getpid(),
    }
    tmp = run_dir / ".run.json.tmp"
    tmp.write_text(json.dumps(links, indent=2))
    tmp.replace(run_dir / "run.json")
    if links["prefect_flow_run_id"]:
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(
                key="run-links", description=f"Stagewise run {ctx.run_id}",
                markdown=(f"# Stagewise run `{ctx.run_id}`\n\n| | |\n|---|---|\n"
                          f"| reports | `{run_dir}` |\n| MLflow tracking | `{tracking_uri}` |\n"
                          f"| MLflow experiment / run | `{experiment_id}` / `{ctx.mlflow_run_id}` |\n"
                          f"| code | `{ctx.code_version}` |\n"))
        except Exception as e:  # noqa: BLE001 - a missing link must not fail the run
            log.debug("run-links artifact not written: %s", e)
    return links


def clean_crash_leftovers(ws: Workspace) -> list[Path]:
    """Remove temp folders of killed writers (`models/.<stage>.tmp-<pid>`, `.old-<pid>`, `<stage>.tmp`).

    Only called under the workspace lock, and only for pids that are gone: a live writer is never touched.
    Checkpoints (`models/<stage>.checkpoints/`) stay: they are how an interrupted stage resumes.
    """
    removed: list[Path] = []
    models = ws.root / "models"
    if not models.is_dir():
        return removed
    for p in models.iterdir():
        name = p.name
        pid = None
        if name.startswith(".") and (".tmp-" in name or ".old-" in name):
            tail = name.rsplit("-", 1)[-1]
            pid = int(tail) if tail.isdigit() else None
        elif not name.endswith(".tmp"):
            continue
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.warning("removed %d half-written folder(s) left by a killed run: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_runs(ws: Workspace, keep: str) -> list[str]:
    """MLflow runs of this workspace still RUNNING are from killed processes (we hold the lock): KILLED.

    Filtered on the `reports_dir` tag, so other workspaces sharing a tracking server are not touched.
    """
    import mlflow

    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(_experiment())
    if exp is None:
        return []
    prefix = str(ws.reports).replace("'", "")
    dead = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=500)
            if r.info.run_id != keep and r.data.tags.get("reports_dir", "").startswith(prefix + os.sep)]
    ids = []
    for parent in dead:
        pipeline_run = parent.data.tags.get("pipeline_run", "")
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
                                       " and attributes.status = 'RUNNING'")
        for r in [*children, parent]:
            client.set_tag(r.info.run_id, "killed_detected_by", "next run (workspace lock was free)")
            client.set_terminated(r.info.run_id, "KILLED")
            ids.append(r.info.run_id)
        log.warning("MLflow run %s (pipeline run %s) was left RUNNING by a killed process: marked KILLED",
                    parent.info.run_id, pipeline_run)
    return ids


def _experiment() -> str:
    from stagewise.registry import EXPERIMENT

    return EXPERIMENT


def data_task_runner(ops):
    """The data phase's Prefect task runner: threads (default) or Dask (`ops.data_runner: dask`).

    Dask: `ops.dask_address` names a running scheduler; without one a LocalCluster of
    `ops.dask_workers` processes lives as long as the data phase.
    """
    if ops.data_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if ops.dask_address:
            return DaskTaskRunner(address=ops.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": ops.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


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
        # The temporary API server takes > 20 s (Prefect's default) to start on a busy 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def local_prefect(preload: tuple[str, ...] = ()):
    """Around a flow call from the CLI: Prefect's temporary API server, started while we import.

    Without PREFECT_API_URL, Prefect starts a temporary server subprocess on the first flow call and
    waits idle until it answers (~7 s here): starting it first, in a thread, overlaps that wait with
    the imports the run needs anyway (`preload`, module names). Flow-run heartbeats are switched off for the temporary server:
    they let a server notice a crashed run, and this one lives and dies with this process. Against a
    real server (PREFECT_API_URL set) nothing changes.
    """
    import importlib
    import threading

    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()

    def start() -> None:
        try:
            server.start()
        except Exception as e:  # noqa: BLE001 - the flow call starts it again and reports the error
            log.debug("early start of Prefect's temporary server failed: %s", e)

    # `start()` marks the server running before it answers: the flow may only be called after join().
    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    for name in preload:
        importlib.import_module(name)
    thread.join()
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


def log_data_step(ctx: RunContext, step: str, stats: dict, out_dir: Path | None) -> None:
    """A nested MLflow run per data step: its params section, counts per kind/reason, Data Docs."""
    import mlflow

    from stagewise.registry import EXPERIMENT

    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=step, tags={
        "mlflow.parentRunId": ctx.mlflow_run_id or "", "stage": step, "pipeline_run": ctx.run_id})
    metrics = {}
    for key in ("input", "kept", "removed", "quarantined", "edited"):
        val = stats.get(key)
        if isinstance(val, dict):
            metrics.update({f"{key}.{k}": float(v) for k, v in val.items() if isinstance(v, (int, float))})
        elif isinstance(val, (int, float)) and not isinstance(val, bool):
            metrics[key] = float(val)
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    docs = stats.get("data_docs")   # relative to the step's out_dir
    docs = Path(out_dir) / docs if docs and out_dir is not None else None
    if docs is not None and docs.exists():
        client.log_artifacts(run.info.run_id, str(docs.parent), artifact_path="data_docs")
    if out_dir is not None and (Path(out_dir) / "stats.json").exists():
        client.log_artifact(run.info.run_id, str(Path(out_dir) / "stats.json"))
    client.set_terminated(run.info.run_id, "FINISHED")
