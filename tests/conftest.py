"""Suite-wide environment: offline, quiet, and every store (Prefect, MLflow, DVC) in temp dirs."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_TMP_HOME = tempfile.mkdtemp(prefix="stagewise-prefect-")
atexit.register(shutil.rmtree, _TMP_HOME, ignore_errors=True)   # each pytest process left ~7 MB in /tmp
for k, v in {
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": _TMP_HOME,
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ[k] = v
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Under pytest-xdist the cores are shared out between the workers (torch reads this when it starts):
# oversubscribed OpenMP threads spin-wait on each other, a second process slows a 2-thread torch run
# 3-4x on 2 cores. Pipelines the tests start get the same share (make_workspace).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def make_workspace(dest: Path) -> Path:
    """A fresh workspace: the project's params.yaml, dvc.yaml and evals/, nothing else (under
    pytest-xdist, run.threads is the worker's share of the cores)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "evals", dest / "evals", dirs_exist_ok=True)
    if _WORKERS > 1:
        params = dest / "params.yaml"
        text, n = re.subn(r"(?m)^(run:\n(?:  .*\n)*?  threads: )\d+$", rf"\g<1>{_THREADS}", params.read_text())
        assert n == 1, "params.yaml: run.threads not found"
        params.write_text(text)
    return dest


def docs_workspace(dest: Path) -> Path:
    """make_workspace plus `.venv` → this interpreter's venv: the docs write `.venv/bin/…`."""
    import sys

    ws = make_workspace(dest)
    (ws / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return ws


def workspace_env(ws: Path) -> dict:
    """The environment a user's shell in `ws` has: `.venv/bin` first, the workspace's own stores."""
    env = dict(os.environ, PATH=f"{ws / '.venv' / 'bin'}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_HOME"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="session")
def finished_smoke_workspace(tmp_path_factory) -> Path:
    """One `stagewise run --profile smoke` per session (per xdist worker), shared by the slow tests that
    read a finished run (tests/test_docs.py, tests/test_workspace_move.py). Read it; copy it to change it."""
    import subprocess
    import sys

    ws = docs_workspace(tmp_path_factory.mktemp("smoke-shared") / "ws")
    proc = subprocess.run([str(Path(sys.executable).parent / "stagewise"), "run", "--profile", "smoke"], cwd=ws,
                          env=workspace_env(ws), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return ws


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks_between_tests():
    """`mlflow.set_tracking_uri()` exports MLFLOW_TRACKING_URI into os.environ (MLflow 3), so a test
    that reads its workspace's registry in-process would point every later test's pipeline
    subprocess at *that* store: the next workspace then "finds" its models cached in a stranger's
    registry (the CI failure of 2026-12-01, test_ops_prefect_server → test_ops_resume)."""
    yield
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(k, None)


@pytest.fixture(scope="module", autouse=True)
def _no_registry_uri_leaks_between_files():
    """MLflow's process-wide URIs outlive the variables the fixture above removes: `mlflow.set_registry_uri()`
    (stagewise.registry.setup_tracking, tests/test_e2e.py) stays set after its file, and a later
    `MlflowClient(tracking_uri=…)` without a registry_uri reads that stale store (the CI failure of
    2026-12-07: the cluster test's client searched an earlier file's sqlite registry, on the same xdist
    worker). Per file, not per test: a file's module fixture sets them once for all its tests."""
    yield
    import sys

    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
        sys.modules["mlflow"].set_registry_uri(None)


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_temporary_server():
    """Stop Prefect's temporary server while pytest's streams are still open.

    Left to Prefect's atexit hook, it logs "Stopping temporary server" into a stream pytest has
    already closed, and a `--- Logging error ---` traceback follows the test summary. Prefect keeps
    its servers in a class-level registry (`_instances`, private: read defensively). Whatever Prefect
    still logs from its own exit hooks (its log worker flushing can start a server again) goes to
    streams pytest has closed: logging's own error report is switched off for that last moment."""
    yield
    import logging
    import sys

    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is not None:
        for server in list(getattr(server_mod.SubprocessASGIServer, "_instances", {}).values()):
            server.stop()
    logging.raiseExceptions = False
