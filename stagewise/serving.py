"""Serving a registered version with MLflow's chat schema, tool calls included.

Every version is one MLflow model with two flavours over the same weights (registry.log_model_version
logs it through `Model.log(flavor=stagewise.serving)`, MLflow's entry point for a flavour module):

- `transformers`: exactly what `mlflow.transformers.save_model` writes (weights, tokenizer, task
  `llm/v1/chat`, MLflow's chat signature), so `mlflow.transformers.load_model(...,
  return_type="components")` and `stagewise download` read it as before;
- `python_function`: the same folder with this module as its loader module (MLflow's documented
  "loader module" workflow: `_load_pyfunc(path)` returns an object with `predict`). It loads MLflow's
  own transformers wrapper (same pipeline, same NF4 / int8 loading) and changes two things:
  the conversation is rendered with the request's `tools` the way training rendered it
  (stagewise.chat.chat_prompt: the model's own `tools` rendering, or the plain one of
  stagewise/tools.py), and a reply that is well-formed `<tool_call>` blocks naming declared tools
  comes back as OpenAI `tool_calls` (`finish_reason: tool_calls`); any other reply stays text.

Why not the transformers flavour alone: its chat path renders `messages` without `tools` and always
answers `content` (mlflow/transformers/llm_inference_utils.py). Why not a separate pyfunc model: the
registry would hold two models per stage, and `mlflow.transformers.load_model` on the champion (the
documented way to load it) would stop working. docs/serving.md.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

# The logged model's flavour in MLflow's records: it is a transformers model.
FLAVOR_NAME = "transformers"


def save_model(path: str, mlflow_model, **kwargs) -> None:
    """`mlflow.transformers.save_model`, then the pyfunc flavour's loader pointed at this module.

    `mlflow.models.Model.log(flavor=<module>)` calls this; everything else (LoggedModel, artifacts,
    registration) is MLflow's own logging path."""
    import mlflow
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.pyfunc import FLAVOR_NAME as PYFUNC, MAIN

    mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    if PYFUNC not in mlflow_model.flavors:   # MLflow adds it for text-generation pipelines; a chat model is one
        raise RuntimeError(f"{path}: MLflow wrote no python_function flavour for this model; it cannot be served")
    mlflow_model.flavors[PYFUNC][MAIN] = __name__
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> "ChatWithTools":
    """The pyfunc loader (`python_function.loader_module` in the MLmodel)."""
    import mlflow.transformers

    return ChatWithTools(mlflow.transformers._load_pyfunc(path, model_config))


class ChatWithTools:
    """MLflow's transformers chat wrapper, with `tools` rendered into the prompt and calls parsed out."""

    def __init__(self, inner):
        self.inner = inner

    def get_raw_model(self):
        return self.inner.get_raw_model()

    def predict(self, data, params: dict[str, Any] | None = None) -> list[dict]:
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.transformers.llm_inference_utils import preprocess_llm_inference_input

        from stagewise.chat import chat_prompt
        from stagewise.tools import ToolError, tool_specs

        # One request per row; `tools` belong to their row (MLflow reads other settings from the first).
        if isinstance(data, pd.DataFrame):
            tools = list(data["tools"]) if "tools" in data else [None] * len(data)
            data = data.drop(columns=["tools"], errors="ignore")
        elif isinstance(data, dict):
            data = dict(data)
            tools = [data.pop("tools", None)]
        else:
            tools = []   # not a chat request: MLflow's preprocessing below says what it expects
        tools = [t if isinstance(t, list) and t else None for t in tools]
        # MLflow's chat path up to the prompt: `max_tokens` -> `max_new_tokens`, `stop` -> stopping criteria
        params = {**self.inner.model_config, **(params or {})}
        conversations, params = preprocess_llm_inference_input(data, params, self.inner.flavor_config)
        tok = self.inner.pipeline.tokenizer
        try:
            for t in tools:
                tool_specs(t)   # a tools list of the wrong shape is the request's fault, whatever the template
            # For a conversation without tools this is MLflow's own rendering (apply_chat_template
            # with the generation prompt); with tools it is what training rendered.
            prompts = [chat_prompt(tok, msgs, t) for msgs, t in zip(conversations, tools)]
        except ToolError as e:
            raise MlflowException.invalid_parameter_value(f"{e.problem}; {e.fix}") from None
        # MLflow's generation and reply (usage, finish_reason, id, model) from the rendered prompts:
        # what its own predict() does after rendering (mlflow/transformers/__init__.py). A private
        # method of the pinned MLflow; tests/test_serving.py fails first if an upgrade moves it.
        replies = self.inner._predict(prompts, params)
        return [with_tool_calls(r, t) if t else r for r, t in zip(replies, tools)]


def tool_message(text: str, tools: Any) -> dict | None:
    """The assistant message carrying `tool_calls` for a reply to a request that declared `tools`, or
    None when the reply is to stay text: no call, a call that does not parse (stagewise.tools.parse_reply),
    or a call naming a tool the request did not declare. Arguments go out as a JSON string (OpenAI's
    and MLflow's `ToolCall`); any text beside the calls is the message's `content`."""
    from mlflow.types.llm import ChatMessage, FunctionToolCallArguments

    from stagewise.tools import parse_reply, tool_specs

    reply = parse_reply(text)
    declared = tool_specs(tools)
    if not reply.ok or not reply.calls or any(c["name"] not in declared for c in reply.calls):
        return None
    calls = [FunctionToolCallArguments(name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))
             .to_tool_call(id=f"call_{uuid.uuid4().hex[:24]}") for c in reply.calls]
    return ChatMessage(role="assistant", content=reply.text or None, tool_calls=calls).to_dict()


def with_tool_calls(reply: dict, tools: Any) -> dict:
    """MLflow's chat completion (`choices[i].message.content`) with each choice read for tool calls.

    A reply cut at `max_tokens` (finish_reason `length`) stays text: calls after the cut would be lost."""
    choices = []
    for choice in reply["choices"]:
        msg = tool_message(choice["message"].get("content") or "", tools) if choice["finish_reason"] == "stop" else None
        choices.append({**choice, "message": msg, "finish_reason": "tool_calls"} if msg else choice)
    return {**reply, "choices": choices}
