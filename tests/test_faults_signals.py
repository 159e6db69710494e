"""Signals and a dying orchestration server, on the real `stagewise run` path (subprocesses).

The child runs the real CLI, lock, MLflow bookkeeping, Prefect temporary server and pipeline flow;
only the data and train phases are replaced by a stand-in "training" that opens its stage's MLflow
run and steps until stopped (a real smoke run takes minutes to reach training on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_workspace

CHILD = r"""
import json, os, sys, time
from pathlib import Path
from prefect import flow
import flows.pipeline as fp

root = Path(sys.argv[1])

@flow(name="data")
def data_phase(cfg, ctx, selected):
    return {"stats": {}, "cached": [], "hashes": {}}

@flow(name="train")
def train_phase(cfg, ctx, data, selected):
    import mlflow
    from prefect.server.api.server import SubprocessASGIServer
    server = SubprocessASGIServer()
    with mlflow.start_run(run_name="sft", nested=True, parent_run_id=ctx.mlflow_run_id) as run:
        (root / "training.json").write_text(json.dumps({
            "parent": ctx.mlflow_run_id, "stage": run.info.run_id,
            "server_pid": server.server_process.pid if server.server_process else None}))
        for step in range(100000):          # "training": one short step after another
            time.sleep(0.05)
    return {"lineage": [], "rows": []}

fp.data_phase, fp.train_phase = data_phase, train_phase
from stagewise.cli import app
app(["run", "--profile", "smoke", "--stages", "pretrain", "--config", str(root / "params.yaml")])
"""


def start(ws: Path) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"))
    env.pop("MLFLOW_TRACKING_URI", None)
    # its own session: a signal to its process group is what Ctrl-C in a terminal sends
    return subprocess.Popen([sys.executable, "-c", CHILD, str(ws)], cwd=ws, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_training(ws: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while not (ws / "training.json").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never reached training\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.2)
    time.sleep(0.5)
    return json.loads((ws / "training.json").read_text())


def gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def statuses(ws: Path, *run_ids: str) -> list[str]:
    import sqlite3

    con = sqlite3.connect(ws / "mlflow" / "mlflow.db")
    try:
        return [con.execute("select status from runs where run_uuid=?", (r,)).fetchone()[0] for r in run_ids]
    finally:
        con.close()


@pytest.mark.parametrize("sig,code,name", [
    (signal.SIGINT, 130, "SIGINT (Ctrl-C)"),
    # the same path as SIGINT but for the signal number and Prefect's own SIGTERM handling
    pytest.param(signal.SIGTERM, 143, "SIGTERM", marks=pytest.mark.slow),
])
def test_signal_stops_the_run_marks_it_killed_frees_the_lock_and_exits(tmp_path, sig, code, name):
    from stagewise.lock import workspace_lock

    ws = make_workspace(tmp_path / "ws")
    proc = start(ws)
    info = wait_training(ws, proc)
    t0 = time.time()
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    seconds = time.time() - t0
    assert proc.returncode == code, err[-3000:]
    assert seconds < 10, f"took {seconds:.1f} s"
    assert "Traceback" not in err + out, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: interrupted by {name}: the run stopped, its MLflow runs are marked KILLED and the "
                      "workspace is free; re-run to resume (finished stages are reused)"], err[-3000:]
    assert statuses(ws, info["parent"], info["stage"]) == ["KILLED", "KILLED"]
    with workspace_lock(ws, timeout=0):
        pass
    assert info["server_pid"] and gone(info["server_pid"], 10), "Prefect's temporary server outlived the run"


@pytest.mark.slow   # waits out the grace period (signals.watch_server) after the server's death
def test_orchestration_server_dying_stops_the_run(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = start(ws)
    info = wait_training(ws, proc)
    os.kill(info["server_pid"], signal.SIGKILL)
    t0 = time.time()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: Prefect's temporary server (pid {info['server_pid']}) exited with code -9 mid-run: the run "
        "stopped rather than train without orchestration"), err[-3000:]
    assert statuses(ws, info["stage"])[0] != "RUNNING"
    print(f"stopped {time.time() - t0:.1f} s after the server died")
