"""Serving tool calls (stagewise/serving.py), in process: a reply read into OpenAI `tool_calls` or kept
as text, and the served call rendering back into exactly the prompt training used for the follow-up.
tests/test_serving.py serves a model taught a call through `mlflow models serve`."""

from __future__ import annotations

import json

import pytest

from stagewise.serving import tool_message, with_tool_calls
from tests.test_tools_templates import tokenizer
from tests.tool_fixtures import TOOLS


def call(name, **args) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def reply(content: str, finish_reason: str = "stop") -> dict:
    """What MLflow's transformers chat path answers (mlflow/transformers/llm_inference_utils.py)."""
    return {"id": "r1", "object": "chat.completion", "created": 1, "model": "m",
            "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": content}}]}


def test_a_call_of_a_declared_tool_is_served_as_tool_calls():
    msg = tool_message(call("animal_food", animal="fox"), TOOLS)
    assert msg["role"] == "assistant" and "content" not in msg     # OpenAI: no text beside the call
    (tc,) = msg["tool_calls"]
    assert tc["type"] == "function" and tc["id"].startswith("call_") and len(tc["id"]) > 10
    assert tc["function"]["name"] == "animal_food"
    assert isinstance(tc["function"]["arguments"], str)             # a JSON string, as OpenAI sends it
    assert json.loads(tc["function"]["arguments"]) == {"animal": "fox"}


def test_parallel_calls_and_their_text():
    msg = tool_message("Let me check.\n" + call("add", a=2, b=3) + "\n" + call("animal_food", animal="owl"), TOOLS)
    assert msg["content"] == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [
        ("add", {"a": 2, "b": 3}), ("animal_food", {"animal": "owl"})]
    assert len({c["id"] for c in msg["tool_calls"]}) == 2           # each call its own id


@pytest.mark.parametrize("text", [
    "The fox eats fish.",                                                        # no call
    '<tool_call>{"name": "animal_food", "arguments": {"animal": "fox"</tool_call>',  # JSON cut short
    '<tool_call>{"name": "animal_food", "arguments": ["fox"]}</tool_call>',    # arguments not an object
    '<tool_call>{"arguments": {"animal": "fox"}}</tool_call>',                 # no name
    call("animal_food", animal="fox") + "\n<tool_call>{\"name\": \"add\"",     # a second call unterminated
    call("weather", city="Oslo"),                                                # a tool the request did not declare
])
def test_a_reply_that_is_not_a_well_formed_call_stays_text(text):
    assert tool_message(text, TOOLS) is None
    out = with_tool_calls(reply(text), TOOLS)
    assert out["choices"][0] == {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}


def test_with_tool_calls_keeps_mlflows_reply_and_sets_the_finish_reason():
    out = with_tool_calls(reply(call("add", a=2, b=3)), TOOLS)
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["function"]["name"] == "add"
    kept = ("id", "object", "model", "usage")
    assert {k: out[k] for k in kept} == {k: reply("")[k] for k in kept}
    # a reply cut at max_tokens is not a finished call: it stays text, finish_reason length
    cut = with_tool_calls(reply(call("add", a=2, b=3), "length"), TOOLS)
    assert cut["choices"][0]["finish_reason"] == "length" and "tool_calls" not in cut["choices"][0]["message"]


@pytest.mark.parametrize("kind", ["demo", "qwen"])
def test_the_served_call_renders_back_into_the_training_prompt(kind):
    """The follow-up request (the served message appended as it came, then the tool result) is
    rendered exactly as the training conversation up to the final answer: what the model was taught."""
    from stagewise.chat import chat_prompt, for_template

    tok = tokenizer(kind)
    user = {"role": "user", "content": "What does the fox eat?"}
    served = tool_message(call("animal_food", animal="fox"), TOOLS)
    result = {"role": "tool", "tool_call_id": served["tool_calls"][0]["id"], "content": "fish"}
    trained = [user, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "animal_food", "arguments": {"animal": "fox"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "fish"}, {"role": "assistant", "content": "The fox eats fish."}]
    msgs, tools = for_template(tok, trained, TOOLS)
    full = tok.apply_chat_template(msgs, tokenize=False, **({"tools": tools} if tools else {}))
    prompt = chat_prompt(tok, [user, served, result], TOOLS)
    assert full.startswith(prompt) and full[len(prompt):].startswith("The fox eats fish.")
    assert "animal_food" in chat_prompt(tok, [user], TOOLS)         # the schemas reach the first prompt


def test_without_tools_the_prompt_is_mlflows_own():
    from mlflow.transformers.llm_inference_utils import convert_messages_to_prompt

    from stagewise.chat import chat_prompt

    tok = tokenizer("chatml")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"}]
    assert chat_prompt(tok, msgs) == convert_messages_to_prompt(msgs, tok)
