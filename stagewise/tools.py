"""Tool calling: the record shape, the one plain rendering, reply parsing and the BFCL-style AST checker.

Used by curation (a chat record's calls checked against its declared tools), training (a template
without tool support gets `plain_messages`), evaluation (the `tools` kind, evals/utils.py) and
serving (stagewise/serving.py). docs/data.md has the record shape, docs/evaluation.md the checker.

Record shape (OpenAI's): `tools` is a list of `{"type": "function", "function": {"name",
"description", "parameters": <JSON schema>}}`; an assistant message may carry `tool_calls`, each
`{"id", "type": "function", "function": {"name", "arguments": <object or JSON string>}}`; a `tool`
message answers one call by `tool_call_id`.

The plain rendering (for templates that do not render `tools` themselves) uses no new token:
- the tool schemas go in the system turn (after the record's own system text, if any),
- each call is `<tool_call>{"name": …, "arguments": {…}}</tool_call>` in the assistant turn, after its text,
- each result is a `tool` turn with the result as its content.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Short on purpose: the demo model trains on 128-token windows, and the schemas come on top of this.
TOOLS_HEADER = ("Tools:\n<tools>\n{tools}\n</tools>\nCall a tool with " + OPEN + '{{"name": ..., "arguments": {{...}}}}'
                + CLOSE + " per call.")
_CALL_RE = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


class ToolError(ValueError):
    """A tool-use record that cannot be trained on: a reason code, the problem and the fix."""

    def __init__(self, code: str, problem: str, fix: str):
        super().__init__(problem)
        self.code, self.problem, self.fix = code, problem, fix


# ---------------------------------------------------------------- record shape
def tool_specs(tools: Any) -> dict[str, dict]:
    """name -> function spec ({name, description, parameters}) of a record's `tools` (OpenAI or bare form)."""
    if tools is None:
        return {}
    fix = 'tools is a list of {"type": "function", "function": {"name": "...", "parameters": {...}}}'
    if not isinstance(tools, list):
        raise ToolError("tool_bad_schema", f"'tools' must be a list, got {type(tools).__name__}", fix)
    out = {}
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError("tool_bad_schema", f"tools[{i}] has no function name", fix)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError("tool_bad_schema", f"tools[{i}] ({fn['name']}): parameters must be a JSON schema object", fix)
        out[fn["name"]] = {**fn, "parameters": params}
    return out


def as_call(tc: Any) -> dict:
    """{name, arguments: dict} of one call in OpenAI form (`function: {name, arguments}`) or bare
    form (`{name, arguments}`); arguments may be a JSON string. Raises ToolError."""
    fn = tc.get("function", tc) if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError("tool_bad_call", f"a tool call must name its function, got {_short(tc)}",
                        'write each call as {"type": "function", "function": {"name": "...", "arguments": {...}}}')
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError("tool_bad_arguments", f"call to {fn['name']!r}: arguments are not JSON ({e.msg}): "
                            f"{_short(fn.get('arguments'))}", "write arguments as a JSON object (or a string holding one)") from None
    if not isinstance(args, dict):
        raise ToolError("tool_bad_arguments", f"call to {fn['name']!r}: arguments must be a JSON object, got "
                        f"{_short(args)}", "write arguments as a JSON object")
    return {"name": fn["name"], "arguments": args}


def schema_problem(args: dict, params: dict) -> str | None:
    """Why `args` does not satisfy the parameters' JSON schema (jsonschema's message), or None.

    Unknown parameters count as a problem unless the schema says `additionalProperties: true`: a
    made-up argument is a call no real function accepts."""
    import jsonschema

    schema = dict(params)
    schema.setdefault("type", "object")
    schema.setdefault("additionalProperties", False)
    try:
        err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(args))
    except jsonschema.exceptions.SchemaError as e:
        return f"the tool's parameters are not a valid JSON schema ({e.message})"
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{where + ': ' if where else ''}{err.message}"


def check_chat(rec: dict) -> None:
    """A chat record's tool use is sound: every call names a declared tool with arguments that parse
    and match its schema; every `tool` message answers an earlier call by id. Raises ToolError
    (codes tool_bad_schema, tool_bad_call, tool_undeclared, tool_bad_arguments, tool_unmatched_result)."""
    specs = tool_specs(rec.get("tools"))
    open_ids: set[str] = set()
    for i, m in enumerate(rec["messages"]):
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ToolError("tool_bad_call", f"messages[{i}]: tool_calls must be a list on an assistant message",
                                "put the calls on the assistant message that makes them")
            for j, tc in enumerate(calls):
                call = as_call(tc)
                if call["name"] not in specs:
                    raise ToolError("tool_undeclared", f"messages[{i}].tool_calls[{j}] calls {call['name']!r}, which "
                                    f"the record's tools do not declare ({', '.join(specs) or 'none declared'})",
                                    "declare the function under the record's `tools`, or fix the call's name")
                bad = schema_problem(call["arguments"], specs[call["name"]]["parameters"])
                if bad:
                    raise ToolError("tool_bad_arguments", f"messages[{i}].tool_calls[{j}] ({call['name']}): arguments "
                                    f"do not match the schema: {bad}", "fix the arguments or the tool's parameters schema")
                if isinstance(tc, dict) and tc.get("id") is not None:
                    open_ids.add(str(tc["id"]))
        if m["role"] == "tool":
            cid = m.get("tool_call_id")
            if cid is None or str(cid) not in open_ids:
                raise ToolError("tool_unmatched_result", f"messages[{i}] is a tool result for call id {cid!r}, which "
                                "no earlier assistant call has", "give each call an `id` and each tool message "
                                "the `tool_call_id` of the call it answers")
            open_ids.discard(str(cid))


def has_tools(rec_or_messages: Any) -> bool:
    """A conversation that uses tools (declared tools, calls or tool results)."""
    if isinstance(rec_or_messages, dict):
        if rec_or_messages.get("tools"):
            return True
        rec_or_messages = rec_or_messages.get("messages") or []
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in rec_or_messages)


def language_turns(messages: list[dict]) -> list[dict]:
    """The natural-language turns quality filters judge: system/user/assistant text, not tool results,
    and not an assistant turn that only calls tools."""
    return [m for m in messages if m["role"] != "tool" and not (m.get("tool_calls") and not (m.get("content") or "").strip())]


def exchange_text(rec: dict) -> str:
    """The whole exchange as text (what dedup and decontamination hash): turns, calls and results,
    and the declared tools' names."""
    lines = [f"tools: {' '.join(sorted(tool_specs(rec.get('tools'))))}"] if rec.get("tools") else []
    for m in rec["messages"]:
        calls = "".join(" " + call_text(as_call(tc)) for tc in m.get("tool_calls") or [])
        lines.append(f"{m['role']}: {m.get('content') or ''}{calls}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the plain rendering
def call_text(call: dict) -> str:
    return OPEN + json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False) + CLOSE


def tools_system(tools: Any, system: str | None = None) -> str:
    """The system turn of the plain rendering: the record's system text, then the tool schemas."""
    # compact JSON, one function per line: schemas are the longest part of a tool-use prompt
    schemas = "\n".join(json.dumps(s, ensure_ascii=False, separators=(",", ":")) for s in tool_specs(tools).values())
    head = TOOLS_HEADER.format(tools=schemas)
    return f"{system}\n\n{head}" if system else head


def plain_messages(messages: list[dict], tools: Any = None) -> list[dict]:
    """A tool-use conversation as plain {role, content} turns (the module docstring's rendering)."""
    out: list[dict] = []
    msgs = list(messages)
    if tools:
        system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
        out.append({"role": "system", "content": tools_system(tools, system)})
    for m in msgs:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = "\n".join(call_text(as_call(tc)) for tc in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        out.append({"role": m["role"], "content": content})
    return out


def native_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that renders tools itself: arguments as objects (what HF templates expect)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "id": tc.get("id") if isinstance(tc, dict) else None,
                                "function": as_call(tc)} for tc in m["tool_calls"]]
            m["content"] = m.get("content") or ""
        out.append(m)
    return out


# ---------------------------------------------------------------- replies
@dataclass
class Reply:
    """A generated reply read for tool calls: its text outside the calls, the calls, or why it does not parse."""

    text: str
    calls: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_reply(text: str) -> Reply:
    """`<tool_call>{json}</tool_call>` blocks of a reply (the plain rendering's, also Qwen2.5/Hermes/SmolLM3's).

    A reply with no block is text. A block that is not `{"name": str, "arguments": object}` JSON, or
    an opening tag without its close, makes the reply malformed (error set, no calls)."""
    calls, error = [], None
    for body in _CALL_RE.findall(text):
        try:
            obj = json.loads(body.strip())
            call = as_call(obj)
        except (json.JSONDecodeError, ToolError) as e:
            error = f"a tool call that does not parse ({e}): {_short(body)}"
            break
        calls.append(call)
    rest = _CALL_RE.sub("", text)
    if error is None and OPEN in rest:
        error = "an unterminated <tool_call>"
    if error:
        return Reply(text=text.strip(), calls=[], error=error)
    return Reply(text=rest.strip(), calls=calls)


# ---------------------------------------------------------------- the AST checker (BFCL's rules)
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\\s]")
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
          "object": (dict,), "null": (type(None),)}


def normalize_value(v: Any) -> Any:
    """BFCL's normalisation: strings lowercased without spaces and punctuation, numbers as floats,
    lists and objects element by element."""
    if isinstance(v, str):
        return _PUNCT.sub("", v.lower())
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, list):
        return [normalize_value(x) for x in v]
    if isinstance(v, dict):
        return {k: normalize_value(x) for k, x in v.items()}
    return v


def _type_ok(v: Any, schema: dict) -> bool:
    t = schema.get("type")
    if t is None:
        return True
    types = t if isinstance(t, list) else [t]
    for one in types:
        py = _TYPES.get(one)
        if py is None:
            return True
        if isinstance(v, bool) and one in ("integer", "number"):
            continue
        if isinstance(v, py):
            return True
    return False


def _allowed(expected: Any) -> list[Any]:
    # an expected value may list several right answers: {"one_of": [...]}
    if isinstance(expected, dict) and set(expected) == {"one_of"} and isinstance(expected["one_of"], list):
        return expected["one_of"]
    return [expected]


def call_matches(got: dict, want: dict, spec: dict | None) -> bool:
    """One call against one expected call: same name; every required parameter present, none unknown;
    each value of the schema's type and equal to an allowed answer after normalisation; an optional
    parameter the expected call leaves out may be omitted or given its schema default."""
    if got["name"] != want["name"]:
        return False
    params = (spec or {}).get("parameters") or {}
    props: dict = params.get("properties") or {}
    args, exp = got["arguments"], want.get("arguments") or {}
    if spec is not None:
        if any(r not in args for r in params.get("required") or []):
            return False
        if props and any(k not in props for k in args):
            return False
        if any(not _type_ok(v, props.get(k, {})) for k, v in args.items()):
            return False
    for k in set(args) | set(exp):
        if k not in exp:
            if "default" in props.get(k, {}) and normalize_value(args[k]) == normalize_value(props[k]["default"]):
                continue
            return False
        if k not in args:
            return False
        if normalize_value(args[k]) not in [normalize_value(a) for a in _allowed(exp[k])]:
            return False
    return True


def calls_match(got: list[dict], want: list[dict], specs: dict[str, dict]) -> bool:
    """Parallel calls in any order: a one-to-one matching between got and want (both may be empty)."""
    if len(got) != len(want):
        return False
    if len(got) > 6:   # permutations explode; calls this many are matched greedily
        left = list(want)
        for g in got:
            hit = next((w for w in left if call_matches(g, w, specs.get(w["name"]))), None)
            if hit is None:
                return False
            left.remove(hit)
        return True
    return any(all(call_matches(g, w, specs.get(w["name"])) for g, w in zip(got, order))
               for order in permutations(want))


def score_reply(text: str, tools: Any, expected: list[dict]) -> dict[str, float]:
    """Per-item scores of one generated reply (evaluation kind `tools`, docs/evaluation.md):
    call_accuracy (the AST match; for `expected == []`: no call), name_accuracy (the called names,
    as a multiset), parse_rate (the reply parses into at least one call), irrelevance (no call)."""
    specs = tool_specs(tools)
    want = [as_call(c) for c in expected]
    r = parse_reply(text)
    got = r.calls if r.ok else []
    names = sorted(c["name"] for c in got) == sorted(c["name"] for c in want) and (r.ok or not want)
    return {"call_accuracy": float(r.ok and calls_match(got, want, specs)),
            "name_accuracy": float(names and r.ok),
            "parse_rate": float(r.ok and bool(got)),
            "irrelevance_accuracy": float(r.ok and not got)}


def _short(v: Any, n: int = 80) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."
