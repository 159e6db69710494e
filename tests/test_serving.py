"""Serving from the registry: `mlflow models serve -m models:/<name>@champion` answers OpenAI-style chat.

A tiny model is taught one chat turn (so its reply and its end-of-turn token are known), registered
through `registry.log_model_version` like every stage's model, made champion, and served by MLflow's
own CLI on loopback. The request is plain HTTP (urllib), the way any client would send it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from stagewise import registry
from stagewise.config import GenerateConfig, ModelConfig, TokenizerConfig

QUESTION, ANSWER = "Say hi.", "hi there"
STARTUP_S = 180


@pytest.fixture(scope="module")
def served_store(tmp_path_factory):
    """A temp store whose `serve-test@champion` answers QUESTION with ANSWER and then its end-of-turn token."""
    from stagewise.modeling import build_model, load_tokenizer, save_model
    from tasks.generate import generate
    from tasks.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("serve")
    uri = registry.setup_tracking(root)
    generate(GenerateConfig(n_docs=30, n_junk=2, n_exact_dup=1, n_near_dup=1, n_leaks=1, n_chat=20,
                            n_preference=10, n_verifiable=10, n_eval=5), root / "raw")
    train_tokenizer(TokenizerConfig(vocab_size=300), root / "raw", root / "tok")
    tok = load_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), tok)
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    ids = torch.tensor([tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]])
    assert ids[0, -1].item() == tok.eos_token_id  # the template ends the assistant turn with the eos token
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):  # memorise the one turn, end-of-turn token included
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model(model, tok, root / "model")

    import mlflow

    with mlflow.start_run(run_name="sft") as run:
        version = registry.log_model_version(root / "model", "serve-test", "sft", {"parent_version": "none"},
                                             run.info.run_id)
    registry.client().set_registered_model_alias("serve-test", registry.CHAMPION, version)
    return root, uri, tok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_the_registry_version_is_a_chat_model(served_store):
    import mlflow

    root, _, _ = served_store
    flavor = mlflow.models.get_model_info("models:/serve-test@champion").flavors["transformers"]
    assert flavor.get("inference_task") == registry.CHAT_TASK
    out = mlflow.pyfunc.load_model("models:/serve-test@champion").predict(
        {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 20})
    assert out[0]["choices"][0]["message"]["content"] == ANSWER
    # the reply names the registered model, not the folder it was trained in
    assert flavor["source_model_name"] == "serve-test" and out[0]["model"] == "serve-test"


def test_mlflow_models_serve_answers_openai_style_chat(served_store):
    root, uri, tok = served_store
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"}
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/serve-test@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + STARTUP_S
        while True:
            assert proc.poll() is None, f"mlflow models serve exited ({proc.returncode}): {log.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert time.time() < deadline, f"server not up after {STARTUP_S}s: {log.read_text()[-2000:]}"
                time.sleep(1)
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 20}
        t0 = time.perf_counter()
        reply = _post(f"http://127.0.0.1:{port}/invocations", body)
        latency = time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    choice = (reply[0] if isinstance(reply, list) else reply)["choices"][0]
    usage = (reply[0] if isinstance(reply, list) else reply)["usage"]
    print(f"\nserving: POST /invocations {json.dumps(body)} -> {choice['message']!r} "
          f"(finish_reason={choice['finish_reason']}, {usage['completion_tokens']} tokens, {latency * 1000:.0f} ms)")
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["message"]["content"] == ANSWER
    # stopped at the end-of-turn token: finished by "stop" before max_tokens, the token itself not in the text
    assert choice["finish_reason"] == "stop" and usage["completion_tokens"] < body["max_tokens"]
    assert tok.eos_token not in choice["message"]["content"]
