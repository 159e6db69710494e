"""Chat templates: a model is trained, prompted and evaluated in its own template.

Every stage goes through these helpers, so a foreign base (SmolLM2, Qwen2.5, Llama 3.x, …) keeps its
tokenizer, special tokens and chat template, and the project's demo model keeps its own:

- `prepare_tokenizer`: keeps the template; only a base with *no* template gets `model.chat_template`
  or else `DEFAULT_TEMPLATE` (built from tokens it already has: no token is added, no embedding
  resized). The base folder the pipeline starts from is written with it (stagewise/modeling.py:
  `gguf_to_folder`, `with_chat_template`), and every later folder copies its parent's tokenizer, so
  training, evaluation, compression, serving and `mlflow.transformers.load_model` see one format;
- `training_template`: the same template with `{% generation %}` markers, which is what assistant-only
  loss needs (HF's `return_assistant_tokens_mask`). In order: the template itself when it has markers
  (the demo's); TRL's patched version for the families TRL knows
  (`trl.chat_template_utils.get_training_chat_template`); a marked ChatML template for ChatML templates
  TRL does not patch (SmolLM2's); the file named by `model.chat_template`; otherwise an error naming
  that setting. Whatever the source, it is accepted only if it renders exactly the text the model's
  own template renders on probe conversations: training and inference can never disagree on format;
- `encode_chat`: input ids + assistant mask (content and end-of-turn token) of one conversation;
- tool use (`tools`, assistant `tool_calls`, `tool` turns): a template that renders `tools` itself
  (`native_tools`: Qwen2.5, Llama 3.x, SmolLM3 style) gets them as they are; any other template gets
  the plain rendering of stagewise/tools.py inside its own turns (`for_template`: schemas in the system
  turn, `<tool_call>{…}</tool_call>` in the assistant turn, results as `tool` turns; no token added).
  The mask then covers the assistant's text, its calls and its end-of-turn token, never the schemas or
  results; the render check below includes tool-use probes; `chat_prompt` is the prompt for a reply;
- `end_of_turn_id` / `stop_token_ids`: where generation stops (`<|im_end|>` for ChatML), for
  `generation_config` and every stage's sampling;
- `prompt_ids`: a single-turn prompt in the model's template, generation prompt included.
The saved tokenizer keeps the original template (markers never reach inference).
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.errors import ConfigError

# Only for a base without any chat template (a plain pretrained LM). Reuses the tokenizer's own EOS as
# the end of every assistant turn; roles are plain words, so no token is added. The newlines are
# expressions: `-%}` would strip a literal one (the turns then ran together, "…?Assistant:").
DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)
# A base whose tokenizer starts plain text with BOS (Gemma, Llama) saw it before every document in
# pretraining; chat rendering is tokenized without special tokens, so the template must write it.
DEFAULT_TEMPLATE_BOS = "{{ bos_token }}" + DEFAULT_TEMPLATE


def default_template(tok) -> str:
    ids = tok("a")["input_ids"]
    return DEFAULT_TEMPLATE_BOS if tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id] else DEFAULT_TEMPLATE

FIX = ("set `model.chat_template: <path to a .jinja>` (params.yaml) to a version of the model's template "
       "with {% generation %}…{% endgeneration %} around each assistant reply and its end-of-turn token")


class ChatTemplateError(ConfigError):
    """A template the project cannot train on, phrased for the person who has to fix it (exit 2)."""


# Probe conversations: every shape the stages render (system or not, one or two turns, generation prompt).
_PROBES = [
    ([{"role": "user", "content": "Q1"}], True),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}], False),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}], False),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
      {"role": "assistant", "content": "A2"}], False),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}], True),
]


def prepare_tokenizer(tok, template_path: str | Path | None = None) -> None:
    """Keep the model's template and tokens; give a template-less base the default; a pad token for batches.

    `template_path` (`model.chat_template`) is remembered for this template, so every later
    `training_template(tok)` of any stage in the process uses it."""
    if not tok.chat_template:
        if template_path:   # the user's template is the format itself: it is saved with every model
            p = Path(template_path)
            if not p.is_file():
                raise ChatTemplateError(f"model.chat_template: {p}: no such file; point it at a .jinja template")
            tok.chat_template = p.read_text()
        elif tok.eos_token is None:
            raise ChatTemplateError("the base tokenizer has neither a chat template nor an EOS token to end a "
                                    f"turn with; {FIX}")
        else:
            tok.chat_template = default_template(tok)
    if tok.pad_token is None:
        # padding is masked out everywhere: reusing EOS adds no token (HF's usual choice)
        tok.pad_token = tok.eos_token
    if template_path:
        _USER[_original(tok)] = str(template_path)


def _render(tok, messages, gen: bool, template: str | None = None, tools: list | None = None) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=template,
                                   **({"tools": tools} if tools else {}))


def _original(tok) -> str:
    t = tok.chat_template
    return t["default"] if isinstance(t, dict) else t


def _chatml_training(tok) -> str | None:
    """A marked ChatML template that renders what the model's template renders, or None if not ChatML.

    TRL patches only the exact templates it ships; SmolLM2's (ChatML with a default system prompt) is
    not one of them, and ChatML is the most common shape among small open models. The text before the
    first turn (a BOS, a default system prompt) is read off the original's own rendering, so the
    result is checked against the original like every other source (`_same_renders`)."""

    def turns(msgs):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)

    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    sys = [{"role": "system", "content": "S"}]
    try:
        plain, with_sys = _render(tok, conv, False), _render(tok, sys + conv, False)
    except Exception:
        return None
    if not (plain.endswith(turns(conv)) and with_sys.endswith(turns(sys + conv))):
        return None
    pre_plain, pre_sys = plain[: -len(turns(conv))], with_sys[: -len(turns(sys + conv))]
    return (
        f"{{%- if messages[0]['role'] == 'system' -%}}{{{{ {json.dumps(pre_sys)} }}}}"
        f"{{%- else -%}}{{{{ {json.dumps(pre_plain)} }}}}{{%- endif -%}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _same_renders(tok, template: str) -> str | None:
    """None if `template` renders every probe exactly as the model's template does; else the first difference.

    Tool-use probes go through `for_template` first, as every stage's conversations do: the model's
    own `tools` rendering when it has one, else the plain rendering (stagewise/tools.py)."""
    probes = [(m, None, gen) for m, gen in _PROBES] + [(*for_template(tok, m, t), gen) for m, t, gen in _TOOL_PROBES]
    for msgs, tools, gen in probes:
        try:
            want = _render(tok, msgs, gen, tools=tools)
        except Exception:   # a template that rejects a shape (e.g. no system role): skip that shape
            continue
        try:
            got = _render(tok, msgs, gen, template, tools=tools)
        except Exception as e:
            return f"it fails on {msgs}: {e}"
        if got != want:
            return f"on {msgs} it renders {got!r}, the model's template {want!r}"
    return None


# Tool-use probes (messages, tools, generation prompt): a parallel call, its results, the answer; a prompt.
_PROBE_TOOLS = [{"type": "function", "function": {"name": "f", "description": "F.", "parameters": {
    "type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}]
_TOOL_PROBES = [
    ([{"role": "user", "content": "Q1"}], _PROBE_TOOLS, True),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": "a"}}},
          {"id": "2", "type": "function", "function": {"name": "f", "arguments": {"x": "b"}}}]},
      {"role": "tool", "tool_call_id": "1", "content": "R1"}, {"role": "tool", "tool_call_id": "2", "content": "R2"},
      {"role": "assistant", "content": "A1"}], _PROBE_TOOLS, False),
]
_NATIVE: dict[str, bool] = {}


def native_tools(tok) -> bool:
    """The model's own template renders `tools` (Qwen2.5, Llama 3.x, SmolLM3 style `{%- if tools %}`)."""
    original = _original(tok)
    if original not in _NATIVE:
        q = [{"role": "user", "content": "Q1"}]
        try:
            _NATIVE[original] = _render(tok, q, True, tools=_PROBE_TOOLS) != _render(tok, q, True)
        except Exception:   # a template that fails on tools cannot render them
            _NATIVE[original] = False
    return _NATIVE[original]


def for_template(tok, messages: list[dict], tools: list | None = None) -> tuple[list[dict], list | None]:
    """(messages, tools) as the model's template takes them: unchanged (arguments as objects) for a
    template that renders tools, else the plain rendering inside its own turns (stagewise/tools.py),
    which needs no new token. A conversation without tools passes through as it is."""
    from stagewise.tools import has_tools, native_messages, plain_messages

    if not tools and not has_tools(messages):
        return messages, None
    if native_tools(tok):
        return native_messages(messages), tools or None
    return plain_messages(messages, tools), None


_CACHE: dict[tuple[str, str | None], str] = {}
_USER: dict[str, str] = {}   # original template -> model.chat_template given for it


def training_template(tok, template_path: str | Path | None = None) -> str:
    """The model's template with `{% generation %}` markers (see the module docstring for the sources)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    original = _original(tok)
    template_path = template_path or _USER.get(original)
    key = (original, str(template_path) if template_path else None)
    if key in _CACHE:
        return _CACHE[key]
    if template_path:
        p = Path(template_path)
        if not p.is_file():
            raise ChatTemplateError(f"model.chat_template: {p}: no such file; point it at a .jinja template")
        cand, source = p.read_text(), f"model.chat_template: {p}"
        if not has_generation_markers(cand):
            raise ChatTemplateError(f"{source}: no {{% generation %}} markers; wrap each assistant reply and its "
                                    "end-of-turn token in {% generation %}…{% endgeneration %}")
    elif has_generation_markers(original):
        cand, source = original, "the model's template"
    else:
        try:
            cand, source = get_training_chat_template(tok), "TRL's training template"
        except ValueError:   # TRL: "patching is not supported for this template"
            cand, source = _chatml_training(tok), "the ChatML training template"
        if cand is None:
            raise ChatTemplateError(f"the model's chat template has no {{% generation %}} markers and neither TRL "
                                    f"nor stagewise knows how to add them; {FIX}")
    diff = _same_renders(tok, cand)
    if diff:
        raise ChatTemplateError(f"{source} does not render the model's own format ({diff}); {FIX}")
    _CACHE[key] = cand
    return cand


def encode_chat(tok, messages: list[dict], template_path: str | Path | None = None, tools: list | None = None) -> dict:
    """{input_ids, assistant_masks} of a conversation in the model's format; the mask covers each
    assistant reply (its text and tool calls) and its end-of-turn token (what assistant-only loss
    trains), never the tool schemas or the tool results."""
    messages, tools = for_template(tok, messages, tools)
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=training_template(tok, template_path),
                                  **({"tools": tools} if tools else {}))
    return {"input_ids": list(enc["input_ids"]), "assistant_masks": list(enc["assistant_masks"])}


def end_of_turn_id(tok, template_path: str | Path | None = None) -> int:
    """The token that closes an assistant turn: the last token under the training template's mask."""
    enc = encode_chat(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], template_path)
    last = max(i for i, m in enumerate(enc["assistant_masks"]) if m)
    return enc["input_ids"][last]


def stop_token_ids(tok, template_path: str | Path | None = None) -> list[int]:
    """Generation stops at the end-of-turn token (and at EOS, if that is another token)."""
    ids = [end_of_turn_id(tok, template_path)]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def prompt_ids(tok, question: str) -> list[int]:
    """A single-turn prompt in the model's own template, ready for the assistant's reply."""
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def chat_prompt(tok, messages: list[dict], tools: list | None = None) -> str:
    """A conversation (tools included) rendered in the model's own template, ready for the assistant's reply."""
    messages, tools = for_template(tok, messages, tools)
    return _render(tok, messages, True, tools=tools)
