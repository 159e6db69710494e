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
from stagewise.redact import redact, redact_obj
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

    cfg = load_config(config_path, profile, overrides, root=root)
    ws = Workspace.at(root)
    from stagewise.rerun import forget

    forget(ws.root)   # whatever this run changes, the last "up to date" record stops describing the workspace
    run_id = run_id or new_run_id()
    # dvc.yaml reads stage params from here, so `dvc status` compares against what actually ran.
    resolved = cfg.to_dict()
    from stagewise.hashing import input_hashes

    inputs = input_hashes(cfg, ws.root)
    tmp = ws.resolved_params.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({**resolved, "inputs": inputs}, sort_keys=False))
    tmp.replace(ws.resolved_params)
    run_dir = ws.reports / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    # the report copy is uploaded to MLflow: no credentials in it (stagewise/redact.py)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(redact_obj(resolved), sort_keys=False))
    from stagewise.evalsets import copy_to_report, plan

    # the lm-eval YAMLs this run scores with (absolute data paths): `lm_eval --include_path <run>/evals`
    copy_to_report(plan(cfg, ws.root), ws.root, run_dir)
    dvcops.ensure_repo(ws.root)
    if cfg.data.sources:
        # dvc.yaml's ingest lists data/01_raw (the demo world's drop zone) as a dependency: with user
        # sources nothing writes it, and DVC refuses a missing dependency. The sources themselves are
        # tracked through `inputs.sources` (their content hashes) in params.resolved.yaml; the same hashes
        # here keep DVC from warning about an empty dependency on every commit.
        ws.raw.mkdir(parents=True, exist_ok=True)
        (ws.raw / "sources.json").write_text(json.dumps(inputs["sources"], indent=1, sort_keys=True))
    tracking_uri = registry.setup_tracking(ws.root, private=cfg.ops.private_stores)
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
    client.log_param(run.info.run_id, "overrides", redact(" ".join(overrides)) or "-")
    client.log_artifact(run.info.run_id, str(run_dir / "config.yaml"))
    ctx = RunContext(run_id=run_id, root=ws.root, mlflow_run_id=run.info.run_id,
                     registered_model=cfg.run.registered_model, code_version=code,
                     force=force, force_stages=list(force_stages), weight_chain=tuple(weight_chain))
    mark_dead_runs(ws, keep=run.info.run_id)
    write_run_links(ctx, run_dir, tracking_uri, exp.experiment_id)
    return ctx, cfg


# ------------------------------------------------------------------ cross-links and crash hygiene
def count_params(model_dir) -> int:
    """Parameters stored in a model folder's safetensors (a tied embedding counts once), read from the
    file headers: nothing is loaded."""
    import math

    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def measure_recipe_facts(cfg: Config, model_dir: Path, curated_dir: Path):
    """The numbers the rules need: the starting model's width and size (its folder: the random init or
    model.base), the curated corpus' tokens in that model's tokenizer, and the curated record counts.
    Only what an `auto` setting needs is measured (tokenizing the corpus costs seconds)."""
    from stagewise.recipes import Facts, unresolved

    model_dir, curated_dir = Path(model_dir), Path(curated_dir)
    width = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    todo = set(unresolved(cfg))

    def lines(kind: str) -> int:
        f = curated_dir / f"{kind}.jsonl"
        return sum(1 for line in f.open() if line.strip()) if f.exists() else 0

    params = corpus_tokens = None
    if "pretrain.max_steps" in todo:
        from stagewise.modeling import load_tokenizer, read_jsonl, split_corpus, token_stream

        params = count_params(model_dir)
        tok = load_tokenizer(model_dir)
        docs = [r["text"] for r in read_jsonl(curated_dir / "corpus.jsonl", ["text"])]
        train_docs, _ = split_corpus(docs, cfg.run.seed, cfg.pretrain.eval_fraction)   # what pretraining trains on
        corpus_tokens = len(token_stream(tok, train_docs))   # counted as pack() builds pretraining's blocks
    from stagewise.workspace import Workspace

    raft = Workspace(curated_dir.parent.parent).raft / "chat.jsonl"   # SFT trains on the raft step's chats too
    raft_chats = sum(1 for line in raft.open() if line.strip()) if raft.exists() else 0
    return Facts(width=width, params=params, corpus_tokens=corpus_tokens, chats=lines("chat") + raft_chats,
                 pairs=lines("preference"), problems=lines("verifiable"))


def resolve_recipes(ctx: RunContext, cfg: Config, model_dir: Path) -> Config:
    """`auto` training settings → numbers (stagewise/recipes.py), from the curated data and the starting
    model; printed, written to params.resolved.yaml and the run's config.yaml, logged on the MLflow parent
    run (`recipe.<setting>`). The stages get the resolved config: their cache keys and MLflow params hold
    the numbers, not `auto`."""
    import mlflow

    from stagewise import recipes

    if not recipes.unresolved(cfg):
        recipes.check(cfg)
        return cfg
    ws = ctx.ws
    facts = measure_recipe_facts(cfg, model_dir, ws.curated)
    cfg, resolved = recipes.resolve(cfg, facts)
    recipes.check(cfg)
    log = logging.getLogger("stagewise")
    for r in resolved:
        log.info("recipe: %s", r.line())
    doc = yaml.safe_load(ws.resolved_params.read_text()) if ws.resolved_params.exists() else {}
    inputs = (doc or {}).get("inputs", {})
    tmp = ws.resolved_params.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({**cfg.to_dict(), "inputs": inputs}, sort_keys=False))
    tmp.replace(ws.resolved_params)
    run_dir = ws.reports / ctx.run_id
    (run_dir / "config.yaml").write_text(yaml.safe_dump(redact_obj(cfg.to_dict()), sort_keys=False))
    (run_dir / "recipe.json").write_text(json.dumps(
        {"facts": facts.__dict__, "resolved": [r.__dict__ for r in resolved]}, indent=1))
    if ctx.mlflow_run_id:
        client = mlflow.MlflowClient()
        for r in resolved:
            client.log_param(ctx.mlflow_run_id, f"recipe.{r.setting}", r.value)
        client.log_artifact(ctx.mlflow_run_id, str(run_dir / "recipe.json"))
    return cfg


def write_run_links(ctx: RunContext, run_dir: Path, tracking_uri: str, experiment_id: str) -> dict[str, Any]:
    """reports/<run_id>/run.json: the ids that tie the Prefect flow run, the MLflow run and this folder.

    The MLflow parent run carries `prefect_flow_run_id` and `reports_dir` tags; the Prefect flow run
    gets a `run-links` artifact with the MLflow run and this folder.
    """
    links = {
        "run_id": ctx.run_id,
        "reports_dir": str(run_dir),
        "prefect_flow_run_id": _prefect_flow_run_id(),
        "prefect_api_url": redact(os.environ.get("PREFECT_API_URL")),
        "mlflow_tracking_uri": redact(tracking_uri),
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
                          f"| reports | `{run_dir}` |\n| MLflow tracking | `{links['mlflow_tracking_uri']}` |\n"
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
    unclosed_path = _unclosed_file(ws)
    try:
        unclosed = json.loads(unclosed_path.read_text()) if unclosed_path.exists() else {}
    except (OSError, ValueError):
        unclosed = {}
    for parent in dead:
        pipeline_run = parent.data.tags.get("pipeline_run", "")
        status = unclosed.get(parent.info.run_id, "KILLED")
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
                                       " and attributes.status = 'RUNNING'")
        for r in [*children, parent]:
            client.set_tag(r.info.run_id, "killed_detected_by" if status == "KILLED" else "closed_by",
                           "next run (workspace lock was free)")
            client.set_terminated(r.info.run_id, status)
            ids.append(r.info.run_id)
        if status == "KILLED":
            log.warning("MLflow run %s (pipeline run %s) was left RUNNING by a killed process: marked KILLED",
                        parent.info.run_id, pipeline_run)
        else:
            log.info("MLflow run %s (pipeline run %s) failed before it could be closed (store unwritable then): "
                     "marked %s", parent.info.run_id, pipeline_run, status)
    if unclosed:
        unclosed_path.unlink(missing_ok=True)
    return ids


def _experiment() -> str:
    from stagewise.registry import EXPERIMENT

    return EXPERIMENT


def data_task_runner():
    """The data phase's Prefect task runner: one thread, the steps in order (each depends on the one
    before); the sharded steps spread their own work over Ray (`ops.engine: ray`, stagewise/shards.py)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a flow there is simply no id
        return None


def finish_run(ctx: RunContext, summary: dict[str, Any], status: str = "FINISHED", cfg: Config | None = None) -> Path:
    """Write reports/<run_id>/summary.json (+ reports/latest/), close the MLflow parent run."""
    import mlflow

    run_dir = ctx.ws.reports / ctx.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        # again at the end: a set's prompt field is read from its data, which a fresh run's `generate`
        # writes only after start_run compiled the first copy (it rendered {{prompt}} for `question` rows)
        from stagewise.evalsets import copy_to_report, plan

        copy_to_report(plan(cfg, ctx.root), ctx.root, run_dir)
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


def fail_run(ctx: RunContext, status: str = "FAILED") -> None:
    """Close the pipeline run and its unfinished stage runs as FAILED (an error) or KILLED (a signal).

    Never raises: it runs while another error unwinds. When the store cannot be written (a full
    disk), the run is named in `.stagewise/unclosed-runs.json` so the next run closes it as what it
    was, a failure, instead of reporting a killed process.
    """
    from mlflow import MlflowClient

    if not ctx.mlflow_run_id:
        return
    try:
        client = MlflowClient()
        exp = client.get_run(ctx.mlflow_run_id).info.experiment_id
        for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{ctx.mlflow_run_id}'"):
            # MLflow's start_run() ends an interrupted stage FAILED: it was killed
            if r.info.status == "RUNNING" or (status == "KILLED" and r.info.status == "FAILED"):
                client.set_terminated(r.info.run_id, status)
        client.set_terminated(ctx.mlflow_run_id, status)
    except Exception as e:  # noqa: BLE001 - the original error is what the user must see
        log.warning("could not close MLflow run %s as %s (%s); the next run will", ctx.mlflow_run_id, status,
                    type(e).__name__)
        try:
            path = _unclosed_file(ctx.ws)
            known = json.loads(path.read_text()) if path.exists() else {}
            known[ctx.mlflow_run_id] = status
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known))
        except (OSError, ValueError):
            pass


def _unclosed_file(ws: Workspace) -> Path:
    return ws.root / ".stagewise" / "unclosed-runs.json"


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
        # persisted task results are JSON (paths, hashes, version ids): nothing from disk is unpickled
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
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
    _detach(server)

    started = threading.Event()

    def start() -> None:
        try:
            server.start()
        except Exception as e:  # noqa: BLE001 - the flow call starts it again and reports the error
            log.debug("early start of Prefect's temporary server failed: %s", e)
        finally:
            started.set()
        # The server's parent-death signal fires when the *thread* that started it ends (see _detach):
        # this daemon thread lives as long as the process.
        threading.Event().wait()

    # `start()` marks the server running before it answers: the flow may only be called once it returned.
    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    for name in preload:
        importlib.import_module(name)
    started.wait()
    from stagewise.signals import watch_server

    watching = watch_server(server.server_process) if server.server_process is not None else None
    try:
        with temporary_settings(updates={"flows.heartbeat_frequency": None}):
            yield
    finally:
        if watching is not None:
            watching.set()


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    _PRCTL(1, 15)   # PR_SET_PDEATHSIG = SIGTERM: a kill -9 of the run takes the server with it


try:  # resolved before any fork: the child only calls it
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _detach(server) -> None:
    """Start Prefect's temporary server in its own session, out of the terminal's process group.

    Ctrl-C reaches every process of the foreground group: the server died of the same SIGINT as the
    run and every report of the interruption then failed against a dead API (148 s of retries,
    4 tracebacks). In its own session it keeps serving while the run unwinds and is stopped by
    Prefect's own atexit hook; on Linux a parent-death signal stops it when the run is killed -9
    (it is no longer in the run's process group). Prefect builds the command itself, so only Popen's
    session flags are added, for the duration of that one call.
    """
    import subprocess

    original = server._run_uvicorn_command
    if getattr(original, "_stagewise_detached", False):
        return

    def run_detached():
        popen = subprocess.Popen

        def popen_new_session(*args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            if _PRCTL is not None:
                kwargs.setdefault("preexec_fn", _die_with_parent)
            return popen(*args, **kwargs)

        subprocess.Popen = popen_new_session
        try:
            return original()
        finally:
            subprocess.Popen = popen

    run_detached._stagewise_detached = True
    server._run_uvicorn_command = run_detached


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
