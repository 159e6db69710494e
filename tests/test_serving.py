"""Serving from the registry: `mlflow models serve -m models:/<name>@champion` answers OpenAI-style chat.

A tiny model is taught one chat turn (so its reply and its end-of-turn token are known), registered
through `registry.log_model_version` like every stage's model, made champion, and served by MLflow's
own CLI on loopback. The request is plain HTTP (urllib), the way any client would send it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch

from serve_fixtures import mlflow_serve, post
from stagewise import registry
from stagewise.config import GenerateConfig, ModelConfig, TokenizerConfig

QUESTION, ANSWER = "Say hi.", "hi there"


@pytest.fixture(scope="module")
def served_store(tmp_path_factory):
    """A temp store whose `serve-test@champion` answers QUESTION with ANSWER and then its end-of-turn token."""
    from stagewise.modeling import load_tokenizer
    from tasks.generate import generate
    from tasks.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("serve")
    uri = registry.setup_tracking(root)
    generate(GenerateConfig(n_docs=30, n_junk=2, n_exact_dup=1, n_near_dup=1, n_leaks=1, n_chat=20,
                            n_preference=10, n_verifiable=10, n_eval=5), root / "raw")
    train_tokenizer(TokenizerConfig(vocab_size=300), root / "raw", root / "tok")
    tok = load_tokenizer(root / "tok")
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    ids = torch.tensor([tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]])
    assert ids[0, -1].item() == tok.eos_token_id  # the template ends the assistant turn with the eos token
    champion_taught(tok, {"input_ids": ids, "labels": ids}, root / "model", "serve-test")   # end-of-turn token included
    return root, uri, tok


def champion_taught(tok, batch: dict, folder: Path, name: str) -> None:
    """A tiny model that memorises `batch` (150 AdamW steps), saved to `folder`, registered through
    `registry.log_model_version` as `name` (stage sft) and made its champion."""
    import mlflow

    from stagewise.modeling import build_model, save_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model(model, tok, folder)
    with mlflow.start_run(run_name="sft") as run:
        version = registry.log_model_version(folder, name, "sft", {"parent_version": "none"}, run.info.run_id)
    registry.client().set_registered_model_alias(name, registry.CHAMPION, version)


def test_the_registry_version_is_a_chat_model(served_store):
    import mlflow

    root, _, tok = served_store
    flavor = mlflow.models.get_model_info("models:/serve-test@champion").flavors["transformers"]
    assert flavor.get("inference_task") == registry.CHAT_TASK
    out = mlflow.pyfunc.load_model("models:/serve-test@champion").predict(
        {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 20})
    assert out[0]["choices"][0]["message"]["content"] == ANSWER
    # the reply names the registered model, not the folder it was trained in
    assert flavor["source_model_name"] == "serve-test" and out[0]["model"] == "serve-test"
    # one model, two flavours over the same weights: MLflow's transformers flavour (how the README
    # loads the champion) and a pyfunc flavour whose loader serves tool calls (stagewise/serving.py)
    pyfunc = mlflow.models.get_model_info("models:/serve-test@champion").flavors["python_function"]
    assert pyfunc["loader_module"] == "stagewise.serving"
    parts = mlflow.transformers.load_model("models:/serve-test@champion", return_type="components")
    assert parts["tokenizer"].chat_template == tok.chat_template and parts["model"].num_parameters() > 0


def served(uri: str, model_uri: str, log: Path):
    """`mlflow models serve` on loopback against the store at `uri`; yields its URL."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"}
    return mlflow_serve(mlflow_cli, model_uri, env, log)


def test_mlflow_models_serve_answers_openai_style_chat(served_store):
    root, uri, tok = served_store
    with served(uri, "models:/serve-test@champion", root / "serve.log") as url:
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 20}
        t0 = time.perf_counter()
        reply = post(f"{url}/invocations", body)
        latency = time.perf_counter() - t0
    choice = (reply[0] if isinstance(reply, list) else reply)["choices"][0]
    usage = (reply[0] if isinstance(reply, list) else reply)["usage"]
    print(f"\nserving: POST /invocations {json.dumps(body)} -> {choice['message']!r} "
          f"(finish_reason={choice['finish_reason']}, {usage['completion_tokens']} tokens, {latency * 1000:.0f} ms)")
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["message"]["content"] == ANSWER
    # stopped at the end-of-turn token: finished by "stop" before max_tokens, the token itself not in the text
    assert choice["finish_reason"] == "stop" and usage["completion_tokens"] < body["max_tokens"]
    assert tok.eos_token not in choice["message"]["content"]


# ---------------------------------------------------------------- tool calls (issue 24)
def _tool_chat(question: str, call: dict, result: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": call}]},
            {"role": "tool", "tool_call_id": "c1", "content": result},
            {"role": "assistant", "content": answer}]


TOOL_CHATS = [_tool_chat("What does the fox eat?", {"name": "animal_food", "arguments": {"animal": "fox"}}, "fish",
                         "The fox eats fish."),
              _tool_chat("What is 2 plus 3?", {"name": "add", "arguments": {"a": 2, "b": 3}}, "5", "The answer is 5.")]


@pytest.fixture(scope="module")
def tool_store(served_store):
    """`serve-tools@champion` in the same store: a tiny model taught two tool-use chats (the call given
    the tools, then the answer after the result), loss on the assistant turns only, rendered as SFT
    renders them (stagewise.chat.encode_chat: the demo template has no tools, so the plain rendering)."""
    from stagewise.chat import encode_chat
    from tests.test_tools_templates import tokenizer
    from tests.tool_fixtures import TOOLS

    root, uri, _ = served_store
    tok, tools = tokenizer("demo"), TOOLS[:2]
    encs = [encode_chat(tok, chat, tools=tools) for chat in TOOL_CHATS]
    width = max(len(e["input_ids"]) for e in encs)
    ids = torch.full((len(encs), width), tok.pad_token_id)
    labels = torch.full((len(encs), width), -100)
    attention = torch.zeros((len(encs), width), dtype=torch.long)
    for i, e in enumerate(encs):
        n = len(e["input_ids"])
        ids[i, :n], attention[i, :n] = torch.tensor(e["input_ids"]), 1
        labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(e["input_ids"], e["assistant_masks"])])
    # both chats memorised: ~0.005 nats per assistant token after the 150 steps
    champion_taught(tok, {"input_ids": ids, "attention_mask": attention, "labels": labels}, root / "tool-model",
                    "serve-tools")
    return root, uri, tools


def test_mlflow_models_serve_answers_tool_calls_then_the_answer(tool_store):
    """The acceptance of issue 24 item 4, over plain HTTP: a request with `tools` gets `tool_calls`
    (id, type function, name, arguments as a JSON string; finish_reason tool_calls); the follow-up
    with the tool's result gets the answer as text."""
    root, uri, tools = tool_store
    with served(uri, "models:/serve-tools@champion", root / "serve-tools.log") as url:
        for chat in TOOL_CHATS:
            user, taught, result, answer = chat
            first = {"messages": [user], "tools": tools, "max_tokens": 60}
            reply = post(f"{url}/invocations", first)[0]
            (choice,) = reply["choices"]
            print(f"\nserving: {json.dumps(first)[:120]}… -> {json.dumps(choice)}")
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["role"] == "assistant"
            (tc,) = choice["message"]["tool_calls"]
            assert tc["type"] == "function" and tc["id"]
            assert tc["function"]["name"] == taught["tool_calls"][0]["function"]["name"]
            assert isinstance(tc["function"]["arguments"], str)
            assert json.loads(tc["function"]["arguments"]) == taught["tool_calls"][0]["function"]["arguments"]

            # the client appends the reply as it came and the tool's result for that call's id
            follow = {"messages": [user, choice["message"], {**result, "tool_call_id": tc["id"]}], "tools": tools,
                      "max_tokens": 60}
            reply = post(f"{url}/invocations", follow)[0]
            (choice,) = reply["choices"]
            print(f"serving: follow-up with the tool result -> {json.dumps(choice)}")
            assert choice == {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": answer["content"]}}

        # a call in the conversation whose arguments are not JSON: a 400 naming it, not a stack trace
        bad = {"messages": [TOOL_CHATS[0][0], {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "animal_food", "arguments": "{animal: fox"}}]}],
            "tools": tools}
        with pytest.raises(urllib.error.HTTPError) as e:
            post(f"{url}/invocations", bad)
        assert e.value.code == 400 and "arguments are not JSON" in json.loads(e.value.read())["message"]
        # a tool without a function (MLflow's chat signature lets it through): a 400 naming it
        with pytest.raises(urllib.error.HTTPError) as e:
            post(f"{url}/invocations", {"messages": [TOOL_CHATS[0][0]], "tools": [{"type": "function"}]})
        assert e.value.code == 400 and "tools[0] has no function name" in json.loads(e.value.read())["message"]
