"""A workspace survives `cp -a` and `mv` (issue 23): MLflow records absolute artifact locations, and
`registry.setup_tracking` re-roots a store that was created elsewhere onto its own `mlflow/artifacts/`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import workspace_env
from serve_fixtures import mlflow_serve, post

BIN = Path(sys.executable).parent


def test_a_copied_store_reads_and_writes_its_own_artifacts_once_the_original_is_gone(tmp_path):
    import mlflow

    from stagewise import registry

    a = tmp_path / "a"
    a.mkdir()
    registry.setup_tracking(a)
    with mlflow.start_run() as run:
        mlflow.log_text("logged in a", "note.txt")
    c = registry.client()
    c.create_registered_model("moved")
    c.create_model_version("moved", f"{run.info.artifact_uri}/note.txt", run.info.run_id)

    b = tmp_path / "b with space"
    shutil.copytree(a, b, symlinks=True)     # what `cp -a` does
    shutil.rmtree(a)
    registry.setup_tracking(b)
    assert mlflow.get_experiment_by_name("stagewise").artifact_location == (b / "mlflow" / "artifacts").as_uri()
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/note.txt") == "logged in a"
    assert registry.client().get_model_version("moved", "1").source.startswith((b / "mlflow").as_uri())
    with mlflow.start_run() as later:
        mlflow.log_text("logged in b", "later.txt")   # lands in the copy, not in a re-created original
    assert (b / "mlflow" / "artifacts" / later.info.run_id / "artifacts" / "later.txt").exists() and not a.exists()
    assert registry.setup_tracking(b) and not a.exists()   # a second look changes nothing


def stagewise(ws: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "stagewise"), *args], cwd=ws, env=workspace_env(ws), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(3600)   # the shared smoke run is set up inside this item when it comes first
def test_a_finished_workspace_copied_with_cp_a_loads_serves_and_reruns_cached(finished_smoke_workspace, tmp_path):
    # The shared run stays untouched: a first copy plays the original (a `stagewise registry` there makes
    # its store its own), is copied with `cp -a` to another path and deleted.
    orig = tmp_path / "orig"
    subprocess.run(["cp", "-a", str(finished_smoke_workspace), str(orig)], check=True)
    assert "champion" in stagewise(orig, "registry").stdout
    copy = tmp_path / "elsewhere" / "copy"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(orig), str(copy)], check=True)
    shutil.rmtree(orig)

    again = stagewise(copy, "run", "--profile", "smoke")
    summary = json.loads((copy / "reports" / "latest" / "summary.json").read_text())
    assert summary["data"]["ran"] == [], summary["data"]
    assert all(s["cached"] for s in summary["stages"]), summary["stages"]
    assert f"tracking store moved from {orig}" in again.stderr + again.stdout
    assert not orig.exists()                      # nothing wrote into the old place

    # README "Load the champion anywhere MLflow reaches the store", in the copy
    code = ("import mlflow\n"
            "mlflow.set_tracking_uri('sqlite:///mlflow/mlflow.db')\n"
            "parts = mlflow.transformers.load_model('models:/stagewise@champion', return_type='components')\n"
            "ids = parts['tokenizer']('What is 12 plus 7?', return_tensors='pt')\n"
            "print(parts['model'].generate(**ids, max_new_tokens=4).shape[1] > ids['input_ids'].shape[1])\n")
    out = subprocess.run([str(copy / ".venv" / "bin" / "python"), "-c", code], cwd=copy, env=workspace_env(copy),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-4000:]
    assert not orig.exists()

    # README "Serve the champion", in the copy: the server reads the copy's store and artifacts
    env = dict(workspace_env(copy), MLFLOW_TRACKING_URI="sqlite:///mlflow/mlflow.db")
    with mlflow_serve(copy / ".venv" / "bin" / "mlflow", "models:/stagewise@champion", env, tmp_path / "serve.log",
                      cwd=copy) as url:
        reply = post(f"{url}/invocations", {"messages": [{"role": "user", "content": "What is 12 plus 7?"}],
                                            "max_tokens": 8})
    choice = (reply[0] if isinstance(reply, list) else reply)["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length"), reply
    assert str(orig) not in (tmp_path / "serve.log").read_text() and not orig.exists()
