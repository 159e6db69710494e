"""Schedules on a real Prefect server: `stagewise serve --cron` and prefect.yaml deployments.

Starts `prefect server start` on loopback (a free port, a temp PREFECT_HOME), serves the pipeline
with a cron schedule, triggers a smoke run through the REST API and checks it completed, registered
a model version, and that the Prefect flow run, the MLflow parent run and reports/<run_id>/ point
to each other. Then `prefect deploy` of prefect.yaml against the same server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, wait: float = 30) -> None:
    """Stop a process we started in its own session (and its children), by its group id."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    import httpx

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 240
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            pytest.fail(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield api, dict(env, PREFECT_API_URL=api)
    stop(proc)
    log.close()


def wait_for(fn, timeout: float, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    return None


def get_json(url: str):
    import httpx

    r = httpx.get(url, timeout=30)
    return r.json() if r.status_code == 200 else None


def test_serve_cron_deployment_runs_smoke_and_registers_a_model(prefect_server, tmp_path):
    import httpx

    api, env = prefect_server
    ws = make_workspace(tmp_path / "ws")
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([str(BIN / "stagewise"), "serve", "--cron", "0 3 * * *", "--profile", "smoke",
                              "--name", "nightly-test", "--config", str(ws / "params.yaml")],
                             cwd=ws, env=dict(env, PREFECT_HOME=str(ws / ".prefect")), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dep = wait_for(lambda: get_json(f"{api}/deployments/name/stagewise/nightly-test"), 240)
        assert dep, (tmp_path / "serve.log").read_text()[-3000:]
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["parameters"]["profile"] == "smoke" and dep["parameters"]["workspace"] == str(ws)

        run = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=30).json()
        final = wait_for(lambda: (lambda fr: fr if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED",
                                                                         "CANCELLED") else None)(
            get_json(f"{api}/flow_runs/{run['id']}")), 1500, every=5)
        assert final, "flow run did not finish in 25 min"
        assert final["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-6000:]
    finally:
        stop(serve, signal.SIGINT)
        log.close()

    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    links = json.loads((ws / "reports" / summary["run_id"] / "run.json").read_text())
    # Prefect flow run → reports/<run_id>/run.json → MLflow parent run, and back.
    assert links["prefect_flow_run_id"] == run["id"] == summary["prefect_flow_run_id"]
    assert links["mlflow_run_id"] == summary["mlflow_run_id"]
    import mlflow

    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect_flow_run_id"] == run["id"]
    assert parent.data.tags["reports_dir"] == str(ws / "reports" / summary["run_id"])
    versions = client.search_model_versions("name='stagewise'")
    assert versions and {v.tags["pipeline_run"] for v in versions} == {summary["run_id"]}
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
                           timeout=30).json()
    keys = {a["key"] for a in artifacts}
    assert {"run-links", "run-summary"} <= keys
    run_links = next(a for a in artifacts if a["key"] == "run-links")["data"]
    assert summary["mlflow_run_id"] in run_links and str(ws / "reports" / summary["run_id"]) in run_links


def test_prefect_yaml_deploys_to_a_process_work_pool(prefect_server, tmp_path):
    api, env = prefect_server
    pool = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "stagewise-process", "--type", "process"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    for name in ("nightly", "smoke"):
        out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", name], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        # Prefect 3.8.8 + fastapi 0.154: the deployment is created, then the CLI's closing "is a
        # worker online?" query is rejected (422 on workers/filter, limit=None). Tolerate only that.
        known = "workers/filter" in out.stdout + out.stderr and "422" in out.stdout + out.stderr
        assert out.returncode == 0 or known, out.stdout[-3000:] + out.stderr[-3000:]
    nightly = get_json(f"{api}/deployments/name/stagewise/nightly")
    smoke = get_json(f"{api}/deployments/name/stagewise/smoke")
    assert nightly and smoke
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["work_pool_name"] == "stagewise-process" and nightly["parameters"]["profile"] == "demo"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert smoke["schedules"] == [] and smoke["parameters"]["profile"] == "smoke"
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline"
