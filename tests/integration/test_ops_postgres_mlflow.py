"""MLflow on a tracking server with a PostgreSQL backend store, as a team would run it.

A throw-away PostgreSQL cluster (Debian's `postgresql` package: initdb on loopback, a free port),
`mlflow server --backend-store-uri postgresql://...` with served artifacts, and the smoke pipeline
pointed at it through MLFLOW_TRACKING_URI. Checks the registry through the server *and* the rows in
PostgreSQL. Skipped where PostgreSQL or psycopg is missing (scripts/integration.sh installs both).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import make_workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    pytest.importorskip("psycopg", reason="pip install -e '.[ops]' (psycopg, SQLAlchemy's postgresql:// driver)")
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL not installed (apt-get install -y postgresql; scripts/integration.sh does it)")
    # Not under pytest's basetemp: that is private to root, and the server runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="stagewise-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for d in (base, sock):
            shutil.chown(d, "postgres")
    out = as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
    assert out.returncode == 0, out.stderr
    port = free_port()
    out = as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-w", "-t", "120",
                       "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
    assert out.returncode == 0, out.stderr + (base / "pg.log").read_text()[-2000:]
    try:
        out = as_postgres([str(bindir.parent / "bin" / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                           "-U", "postgres", "mlflow"])
        assert out.returncode == 0, out.stderr
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    import httpx

    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres, "--serve-artifacts",
         "--artifacts-destination", str(base / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server did not start:\n" + (base / "server.log").read_text()[-3000:])
        time.sleep(1)
    yield url, base
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_smoke_pipeline_tracks_and_registers_in_postgres(mlflow_server, postgres, tmp_path):
    import mlflow
    import psycopg

    url, server_dir = mlflow_server
    ws = make_workspace(tmp_path / "ws")
    env = dict(os.environ, MLFLOW_TRACKING_URI=url, PREFECT_HOME=str(ws / ".prefect"),
               PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.run([str(BIN / "stagewise"), "run", "--profile", "smoke", "--config", str(ws / "params.yaml")],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())

    # Nothing went to the workspace's own SQLite store: the server got it all.
    assert not (ws / "mlflow" / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline_run"] == summary["run_id"]
    versions = client.search_model_versions("name='stagewise'")
    trained = [r for r in summary["stages"] if r.get("model_version")]
    assert trained and {r["model_version"] for r in trained} <= {v.version for v in versions}
    sft = next(v for v in versions if v.tags.get("stage") == "sft")
    assert sft.tags["cache_key"] and sft.tags["data_hash"].endswith(".dir")
    # The model files went through the server's artifact proxy into its store.
    assert any(p.name == "model.safetensors" for p in (server_dir / "artifacts").rglob("*"))

    # ... and the rows are in PostgreSQL.
    with psycopg.connect(postgres) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from model_versions where name = 'stagewise'")
        assert cur.fetchone()[0] == len(versions)
        cur.execute("select status from runs where run_uuid = %s", (summary["mlflow_run_id"],))
        assert cur.fetchone()[0] == "FINISHED"

    # A re-run against the same server reuses every registered version.
    again = subprocess.run([str(BIN / "stagewise"), "run", "--profile", "smoke", "--config", str(ws / "params.yaml")],
                           cwd=ws, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-4000:]
    second = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    assert second["stages"] and all(r["cached"] for r in second["stages"])
    assert len(client.search_model_versions("name='stagewise'")) == len(versions)
