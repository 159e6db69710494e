"""Shared stores that do not answer: one `error:` line naming the address (credentials masked), exit 3,
within seconds — not minutes of MLflow's and botocore's retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_workspace

BIN = Path(sys.executable).parent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nothing listens once the socket is closed


def test_an_unreachable_mlflow_server_is_one_line_and_exit_3(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    uri = f"http://stagewise:hunter2@127.0.0.1:{closed_port()}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PREFECT_HOME=str(ws / ".prefect"))
    t0 = time.time()
    out = subprocess.run([str(BIN / "stagewise"), "run", "--profile", "smoke", "--config", str(ws / "params.yaml")],
                         cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 30
    assert out.returncode == 3, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "MLflow tracking server" in errors[0] and "127.0.0.1" in errors[0], out.stderr
    assert "hunter2" not in out.stderr + out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize("settings,uri", [
    (["ops.engine=ray", "ops.ray_scratch=s3://stagewise/shards"], "s3://stagewise/shards"),
    (["ops.result_storage=s3://stagewise/results"], "s3://stagewise/results"),   # Prefect's task results
])
def test_an_unreachable_s3_store_is_one_line_and_exit_3(tmp_path, settings, uri):
    pytest.importorskip("boto3", reason="the cluster extra is not installed (pip install -e '.[cluster]')")
    ws = make_workspace(tmp_path / "ws")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
               AWS_SECRET_ACCESS_KEY="s3cr3t-value", PREFECT_HOME=str(ws / ".prefect"))
    t0 = time.time()
    out = subprocess.run([str(BIN / "stagewise"), "run", "--profile", "smoke", "--config", str(ws / "params.yaml"),
                          *[a for s in settings for a in ("--set", s)]],
                         cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 30
    assert out.returncode == 3, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0] and endpoint in errors[0], out.stderr
    assert "s3cr3t-value" not in out.stderr + out.stdout and "Traceback" not in out.stderr
