"""Prefect task results in S3 (`ops.result_storage`): a result persisted by one host is a cache hit on
another that shares nothing but the bucket — its own workspace folder, PREFECT_HOME and Prefect server.

Each "host" is a process of its own (moto's S3 server on loopback between them) running a tiny flow
through the stages' wiring: `prefect_result_storage` (the block) and `cached_task_options` (JSON,
the key function, the storage), as flows/pipeline.py's train phase uses them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

boto3 = pytest.importorskip("boto3", reason="the cluster extra is not installed (pip install -e '.[cluster]')")
pytest.importorskip("s3fs", reason="the cluster extra is not installed (pip install -e '.[cluster]')")

SECRET = "s3cr3t-result-key"

HOST = '''
import json, sys
from pathlib import Path

from prefect import flow, task

from stagewise.config import OpsConfig
from stagewise.stage import cached_task_options, prefect_result_storage


@task
def count_words(text: str) -> dict:
    Path("executed").write_text(sys.argv[2])   # in this host's workspace: did the body run here?
    return {"words": len(text.split()), "host": sys.argv[2]}


def key(_ctx, params):
    return "stagewise-test-words-" + str(len(params["text"]))


@flow
def tiny(result_storage):
    storage = prefect_result_storage(OpsConfig(result_storage=result_storage).result_storage)
    state = count_words.with_options(**cached_task_options(key, storage))("to be or not", return_state=True)
    return {"state": state.name, "result": state.result()}


print("RESULT " + json.dumps(tiny(sys.argv[1] if sys.argv[1] != "none" else None)))
'''


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="AKIAEXAMPLE",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket="stagewise")
    yield env, client
    server.stop()


def on_host(name: str, tmp: Path, env: dict, storage: str | None) -> dict:
    """The tiny flow in a process of its own: workspace tmp/<name>, PREFECT_HOME inside it."""
    ws = tmp / name
    ws.mkdir()
    host_env = dict(os.environ, **env, PREFECT_HOME=str(ws / ".prefect"), PYTHONPATH=str(ROOT),
                    PREFECT_RESULTS_DEFAULT_SERIALIZER="json")
    host_env.pop("PREFECT_API_URL", None)   # each host its own temporary Prefect server
    (ws / "host.py").write_text(HOST)
    out = subprocess.run([sys.executable, "host.py", storage or "none", name], cwd=ws, env=host_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert SECRET not in out.stdout + out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")) | {"ws": ws}


@pytest.mark.slow   # three processes, each with its own temporary Prefect server: ~1 min on 2 cores
def test_a_result_written_on_one_host_is_a_cache_hit_on_another(s3, tmp_path):
    env, client = s3
    a = on_host("a", tmp_path, env, "s3://stagewise/prefect-results")
    assert a["state"] == "Completed" and a["result"] == {"words": 4, "host": "a"}
    assert (a["ws"] / "executed").read_text() == "a"
    stored = [o["Key"] for o in client.list_objects_v2(Bucket="stagewise", Prefix="prefect-results/")["Contents"]]
    assert stored == ["prefect-results/stagewise-test-words-12"]
    record = json.loads(client.get_object(Bucket="stagewise", Key=stored[0])["Body"].read())
    assert record["metadata"]["serializer"]["type"] == "json"   # nothing on a shared store is a pickle
    assert not (a["ws"] / ".prefect" / "storage").exists()      # nothing went to the host's own disk

    b = on_host("b", tmp_path, env, "s3://stagewise/prefect-results")
    assert b["state"] == "Cached" and b["result"] == {"words": 4, "host": "a"}   # host a's result, read back
    assert not (b["ws"] / "executed").exists()
    for ws in (a["ws"], b["ws"]):   # the block holds the path; s3fs takes the keys from the environment
        assert SECRET.encode() not in (ws / ".prefect" / "prefect.db").read_bytes()

    # without the setting each host persists into its own PREFECT_HOME: host c cannot read a's result
    c = on_host("c", tmp_path, env, None)
    assert c["state"] == "Completed" and c["result"]["host"] == "c"
    assert (c["ws"] / "executed").exists() and (c["ws"] / ".prefect" / "storage").is_dir()

