"""Declared evaluation sets: `evaluate.sets` in params.yaml → lm-eval task YAMLs, stage targets, gate rules.

One generic kind per data shape; each set compiles into a plain lm-eval task (the harness stays the
engine) written with absolute data paths, so `lm_eval --include_path <dir> --tasks <name>` re-runs it
from anywhere:

    kind        fields (one JSON object per line)        metrics (first = default)
    text        {text}                                  word_perplexity, bits_per_byte
    mc          {context, choices, gold}                acc, acc_norm
    qa          {question, answer}  (chat template)     token_f1, exact_match
    pairs       {prompt, chosen, rejected}              margin, acc
    verifiable  {prompt, answer}    (chat template)     pass1 (sampled, task <name>_sampled), exact_match (greedy)
    tools       {messages, tools, expected}  (chat)     call_accuracy, parse_rate, name_accuracy,
                                                        irrelevance_accuracy (items with expected []: task <name>_irrelevance)

`<stage>.target` names a set (its default metric) or `set.metric`; `gate.general` lists the forgetting
guard's `set[.metric]`s. Left unset they resolve here: the demo world's sets when `data.sources` is empty,
otherwise the user's declared set of the stage's kind, or else a held-out share of the stage's own data
(`heldout_<kind>`, written by `decontaminate`). A user's model is never scored on the demo world.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stagewise.metrics import higher_is_better

# kind → accepted prompt-field names (first match in the file wins), other required fields, metrics
# (the first is the kind's default; their directions are the one metrics table's, stagewise/metrics.py).
_KINDS: dict[str, dict[str, Any]] = {
    "text": {"fields": ("text",), "metrics": ("word_perplexity", "bits_per_byte")},
    "mc": {"fields": ("context", "choices", "gold"), "metrics": ("acc", "acc_norm")},
    "qa": {"prompt": ("question", "prompt"), "fields": ("answer",), "metrics": ("token_f1", "exact_match")},
    "pairs": {"fields": ("prompt", "chosen", "rejected"), "metrics": ("margin", "acc")},
    "verifiable": {"prompt": ("prompt", "question"), "fields": ("answer",), "metrics": ("pass1", "exact_match")},
    # open book (stagewise/rag.py): the oracle among 4 distractors, then (`_no_oracle`, task <name>_no_oracle)
    # distractors only; quote_valid: the reply quotes a given document verbatim
    "rag": {"fields": ("question", "answer"), "metrics": ("token_f1", "exact_match", "quote_valid",
                                                          "token_f1_no_oracle", "exact_match_no_oracle")},
}
_KINDS["tools"] = {"fields": ("messages", "tools", "expected"),
                   "metrics": ("call_accuracy", "parse_rate", "name_accuracy", "irrelevance_accuracy")}
KINDS = {k: {**v, "metrics": {m: higher_is_better(m) for m in v["metrics"]}} for k, v in _KINDS.items()}
EXAMPLES = {
    "text": '{"text": "A held-out paragraph."}',
    "mc": '{"context": "The cat sat on the", "choices": ["mat.", "sky."], "gold": 0}',
    "qa": '{"question": "What does ingest do?", "answer": "It reads every source."}',
    "pairs": '{"prompt": "...", "chosen": "a good reply", "rejected": "a worse reply"}',
    "verifiable": '{"prompt": "Tom has 3 apples and buys 4. How many?", "answer": "7"}',
    "rag": '{"question": "Where does Zorbin live?", "answer": "Quellport", "documents": ["Zorbin lives in Quellport.", "..."], "oracle": 0}',
}
EXAMPLES["tools"] = ('{"messages": [{"role": "user", "content": "What does the fox eat?"}], "tools": [{"type": '
                     '"function", "function": {"name": "animal_food", "parameters": {"type": "object", "properties": '
                     '{"animal": {"type": "string"}}, "required": ["animal"]}}}], "expected": [{"name": "animal_food", '
                     '"arguments": {"animal": "fox"}}]}')
# Which set kind each training stage is judged on, and which data kind its held-out share comes from.
STAGE_KIND = {"pretrain": "text", "sft": "qa", "preference": "pairs", "reasoning": "verifiable"}
STAGE_DATA = {"pretrain": "corpus", "sft": "chat", "preference": "preference", "reasoning": "verifiable"}
HELDOUT_KIND = {"corpus": "text", "chat": "qa", "preference": "pairs", "verifiable": "verifiable"}

# The demo world (tasks/generate.py writes these files): the defaults when data.sources is empty.
DEMO_DIR = "data/01_raw/benchmarks"
DEMO_SETS: dict[str, tuple[str, str]] = {
    "sw_general_text": ("general_text.jsonl", "text"),
    "sw_general_mc": ("general_mc.jsonl", "mc"),
    "sw_instruct": ("instruct.jsonl", "qa"),
    "sw_preference": ("preference.jsonl", "pairs"),
    "sw_arithmetic": ("arithmetic.jsonl", "verifiable"),
    "sw_arithmetic_unseen": ("arithmetic_unseen.jsonl", "verifiable"),
    "sw_rag": ("rag.jsonl", "rag"),
}
# The demo's tool-use set: in the plan when the world has tool chats (generate.n_tool_chat > 0).
DEMO_TOOLS_SET = ("sw_tools", "tools.jsonl")
# Why these metrics: tasks/evaluate.py's notes (token F1 before EM on held-out facts, the DPO margin
# where acc saturates, sampled pass@1 what GRPO maximizes).
DEMO_TARGETS = {"pretrain": "sw_general_text.word_perplexity", "sft": "sw_instruct.token_f1",
                "preference": "sw_preference.margin", "reasoning": "sw_arithmetic.pass1"}
DEMO_GENERAL = ["sw_general_text.word_perplexity", "sw_general_mc.acc"]

# The generated answer is read like the reasoning reward reads it: "The answer is N", else the last integer.
ANSWER_REGEX = "(?s)The answer is (-?\\d+)|(-?\\d+)(?!.*\\d)"
SAMPLES = 8   # replies per problem for sampled pass@1 (temperature 1.0: the policy GRPO optimizes)
NO_ORACLE = "_no_oracle"   # a rag set's second task (and metric suffix): the same questions, distractors only


class EvalSetError(ValueError):
    """A declared evaluation set that cannot be used, phrased for the person who has to fix it."""


# ---------------------------------------------------------------- resolution
@dataclass(frozen=True)
class Metric:
    """One number a stage row or a gate rule reads: lm-eval task + metric, and the set behind it."""

    set: str
    metric: str
    task: str
    higher_is_better: bool

    @property
    def label(self) -> str:   # how summary rows and gate rules name it (lm-eval task.metric)
        return f"{self.task}.{self.metric}"


@dataclass
class EvalPlan:
    """Every set and task a run evaluates on, resolved against the workspace root."""

    sets: dict[str, dict[str, Any]]          # name → {path (absolute), kind, origin: declared|demo|heldout}
    tasks: list[str] = field(default_factory=list)       # evaluate.tasks entries (names or YAML paths)
    targets: dict[str, Metric] = field(default_factory=dict)
    general: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # what was resolved implicitly, for the summary
    # gate.guard_earlier_targets: a stage is also scored on every earlier stage's target (the rulebook
    # keeps them within their limits), so its evaluations carry those tasks too
    guard_earlier: bool = True

    def heldout_kinds(self) -> list[str]:
        """Data kinds decontaminate must hold out a share of (sets the plan made up)."""
        return [k for k, kind in HELDOUT_KIND.items() if f"heldout_{k}" in self.sets]

    def set_tasks(self, name: str) -> list[str]:
        spec = self.sets[name]
        if spec["kind"] == "tools":
            return [name, f"{name}_irrelevance"]
        if spec["kind"] == "rag":
            return [name, f"{name}{NO_ORACLE}"]
        return [name, f"{name}_sampled"] if spec["kind"] == "verifiable" else [name]

    def task_names(self) -> list[str]:
        """Every lm-eval task of every set plus evaluate.tasks (what `stagewise gate` scores by default)."""
        out = [t for n in self.sets for t in self.set_tasks(n)]
        return out + [task_name(t) for t in self.tasks]

    def stage_tasks(self, stage: str) -> list[str]:
        """A stage's target task, its context tasks, the earlier stages' targets (guarded by the rulebook)
        and every general task (the forgetting guard's view)."""
        head = [self.targets[stage], *self.context(stage)] if stage in self.targets else []
        return list(dict.fromkeys(m.task for m in [*head, *self.earlier_targets(stage), *self.general]))

    def earlier_targets(self, stage: str) -> list[Metric]:
        """The targets of the training stages before `stage` (pipeline order), when they are guarded."""
        order = list(STAGE_KIND)
        if not self.guard_earlier or stage not in order:
            return []
        return [self.targets[s] for s in order[:order.index(stage)] if s in self.targets]

    def context(self, stage: str) -> list[Metric]:
        """Scored beside a stage's target, shown in its rows, never a rule: reasoning's greedy exact match
        and the SFT skill (does GRPO keep what SFT taught); SFT's tool calling (every tools set that is
        not its target: call_accuracy, parse_rate and irrelevance_accuracy) and open-book reading (every rag
        set)."""
        if stage == "sft" and stage in self.targets:
            tools = [Metric(n, m, f"{n}_irrelevance" if m == "irrelevance_accuracy" else n, True)
                     for n, s in self.sets.items() if s["kind"] == "tools" and n != self.targets[stage].set
                     for m in ("call_accuracy", "parse_rate", "irrelevance_accuracy")]
            return tools + [m for m in self.reading(stage) if m != self.targets.get(stage)]
        if stage != "reasoning" or stage not in self.targets:
            return []
        t = self.targets[stage]
        out = []
        if self.sets.get(t.set, {}).get("kind") == "verifiable" and t.metric != "exact_match":
            out.append(Metric(t.set, "exact_match", t.set, True))
        if "sft" in self.targets:
            out.append(self.targets["sft"])
        return out

    def reading(self, stage: str) -> list[Metric]:
        """SFT's open-book numbers, per rag set: token F1 with the oracle among the distractors, the same
        with distractors only (the gap is what reading adds), and quote_valid."""
        if stage not in self.targets:
            return []
        return [_metric(f"{n}.{m}", self, f"evaluate.sets.{n}") for n, s in self.sets.items() if s["kind"] == "rag"
                for m in ("token_f1", f"token_f1{NO_ORACLE}", "quote_valid")]

    def describe(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """name → {path, kind, origin, items, data_hash} of the sets behind the numbers (missing files: None)."""
        out = {}
        for n in names or list(self.sets):
            if n not in self.sets:
                continue
            s, p = self.sets[n], Path(self.sets[n]["path"])
            exists = p.is_file()
            out[n] = {"path": str(p), "kind": s["kind"], "origin": s["origin"],
                      "items": sum(1 for line in p.open() if line.strip()) if exists else None,
                      "data_hash": _file_hash(p) if exists else None}
        return out

    def sets_of_tasks(self, tasks: list[str]) -> list[str]:
        owner = {t: n for n in self.sets for t in self.set_tasks(n)}
        return list(dict.fromkeys(owner[t] for t in tasks if t in owner))


def _file_hash(path: Path) -> str:
    # the same digest as stagewise.hashing.file_hash (which imports this module for input_hashes)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def task_name(entry: str) -> str:
    """An evaluate.tasks entry's lm-eval task name: the YAML's `task:` for a path, else the entry."""
    if entry.endswith((".yaml", ".yml")):
        p = Path(entry)
        return str((yaml.safe_load(p.read_text()) or {}).get("task", p.stem)) if p.is_file() else p.stem
    return entry


def resolve_path(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(root) / p)


def plan(cfg, root: Path) -> EvalPlan:
    """Resolve `evaluate.sets`/`tasks`, `<stage>.target` and `gate.general` of a Config (see module doc)."""
    root = Path(root).resolve()
    ev, user_data = cfg.evaluate, bool(cfg.data.sources)
    notes: list[str] = []
    if ev.sets is None and not user_data:
        sets = demo_plan(root).sets
        if cfg.generate.n_tool_chat > 0:
            sets[DEMO_TOOLS_SET[0]] = {"path": str(root / DEMO_DIR / DEMO_TOOLS_SET[1]), "kind": "tools",
                                       "origin": "demo"}
    else:
        sets = {n: {"path": str(resolve_path(s.path, root)), "kind": s.kind, "origin": "declared"}
                for n, s in (ev.sets or {}).items()}
    tasks = [str(resolve_path(t, root)) if t.endswith((".yaml", ".yml")) else t for t in ev.tasks]
    p = EvalPlan(sets=sets, tasks=tasks, notes=notes, guard_earlier=cfg.gate.guard_earlier_targets)
    source_kinds = {s.kind for s in cfg.data.sources.values()}

    def heldout(data_kind: str) -> str:
        name = f"heldout_{data_kind}"
        if name not in p.sets:
            p.sets[name] = {"path": str(root / "data" / "05_curated" / "heldout" / f"{data_kind}.jsonl"),
                            "kind": HELDOUT_KIND[data_kind], "origin": "heldout"}
        return name

    for stage, kind in STAGE_KIND.items():
        declared = getattr(cfg, stage).target
        if declared is None and not (ev.sets is None and not user_data):
            of_kind = [n for n, s in sets.items() if s["kind"] == kind]
            if len(of_kind) == 1:
                declared = of_kind[0]
                notes.append(f"{stage}: target {declared} (the only declared {kind} set)")
            elif len(of_kind) > 1:
                raise EvalSetError(f"{stage}.target: several {kind} sets are declared ({', '.join(of_kind)}); "
                                   f"name the one {stage} is judged on, e.g. {stage}: {{target: {of_kind[0]}}}")
            elif user_data and STAGE_DATA[stage] in source_kinds:
                declared = heldout(STAGE_DATA[stage])
                notes.append(f"{stage}: no {kind} set declared: target {declared}, a held-out "
                             f"{cfg.evaluate.holdout_share:.0%} of the {STAGE_DATA[stage]} data (at most "
                             f"{cfg.evaluate.holdout_max} records), decontaminated against training")
            else:
                continue   # nothing to judge this stage on (no data of its kind): no target
        elif declared is None:
            declared = DEMO_TARGETS[stage]
        p.targets[stage] = _metric(declared, p, f"{stage}.target")
    general = cfg.gate.general
    if general is None:
        if ev.sets is None and not user_data:
            general = DEMO_GENERAL
        else:
            general = [n for n, s in sets.items() if s["kind"] in ("text", "mc")]
            if not general and "corpus" in source_kinds:
                general = [heldout("corpus")]
            if general:
                notes.append(f"gate.general: {', '.join(general)} (every declared text/mc set, else held-out corpus)")
    p.general = [_metric(g, p, "gate.general") for g in general]
    return p


def decontamination_inputs(cfg, root: Path) -> dict[str, Any]:
    """decontaminate's references (every declared or demo set; sorted like the folder glob they replace)
    and the held-out shares it cuts for stages with no declared set."""
    p = plan(cfg, root)
    return {"benchmarks_dir": sorted({Path(s["path"]) for s in p.sets.values() if s["origin"] != "heldout"}),
            "heldout": {"kinds": p.heldout_kinds(), "share": cfg.evaluate.holdout_share,
                        "max": cfg.evaluate.holdout_max}}


def demo_plan(root: Path = Path(".")) -> EvalPlan:
    """The demo world's sets, targets and general metrics (what callers without a config are judged on)."""
    p = EvalPlan(sets={n: {"path": str(Path(root).resolve() / DEMO_DIR / f), "kind": k, "origin": "demo"}
                       for n, (f, k) in DEMO_SETS.items()})
    p.targets = {stage: _metric(ref, p, f"{stage}.target") for stage, ref in DEMO_TARGETS.items()}
    p.general = [_metric(g, p, "gate.general") for g in DEMO_GENERAL]
    return p


def _metric(ref: str, p: EvalPlan, key: str) -> Metric:
    """`set`, `set.metric`, `task.metric` (evaluate.tasks) → Metric."""
    name, _, metric = ref.partition(".")
    if name not in p.sets and ref in p.sets:
        name, metric = ref, ""
    if name in p.sets:
        kind = p.sets[name]["kind"]
        metrics = KINDS[kind]["metrics"]
        metric = metric or next(iter(metrics))
        if metric not in metrics:
            raise EvalSetError(f"{key}: {ref!r}: a {kind} set has metrics {', '.join(metrics)}")
        task = f"{name}_sampled" if kind == "verifiable" and metric == "pass1" else name
        if kind == "tools" and metric == "irrelevance_accuracy":
            task = f"{name}_irrelevance"
        if kind == "rag" and metric.endswith(NO_ORACLE):   # the no-oracle task's own metric
            task, metric = f"{name}{NO_ORACLE}", metric[: -len(NO_ORACLE)]
        return Metric(name, metric, task, metrics[metric] if metric in metrics else higher_is_better(metric))
    known = [task_name(t) for t in p.tasks]
    if name in known and metric:   # direction: the metrics table (unknown names: higher is better, lm-eval's default)
        return Metric(name, metric, name, higher_is_better(metric))
    hint = f" (evaluate.tasks entries need a metric: {name}.acc)" if name in known else ""
    raise EvalSetError(f"{key}: {ref!r} is not a declared set ({', '.join(p.sets) or 'none declared'}) "
                       f"nor an evaluate.tasks entry{hint}; declare it under evaluate.sets")


# ---------------------------------------------------------------- checks (config load)
def check_file(name: str, path: Path, kind: str) -> str | None:
    """Problem with a set's file (missing, bad JSON, missing field) as 'file:line: …', or None."""
    if not path.is_file():
        return f"{path}: evaluate.sets.{name}: no such file (relative paths resolve against the workspace root)"
    spec = KINDS[kind]
    n = 0
    halves: set[bool] = set()   # tools: items expecting calls (True) and expecting none (False)
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            n += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{i}: evaluate.sets.{name}: not valid JSON ({e.msg}); one object per line"
            missing = [k for k in spec["fields"] if k not in row]
            if "prompt" in spec and not any(k in row for k in spec["prompt"]):
                missing.insert(0, " or ".join(spec["prompt"]))
            if missing:
                return (f"{path}:{i}: evaluate.sets.{name}: missing field(s) {', '.join(missing)} for a {kind} set; "
                        f"expected e.g. {EXAMPLES[kind]}")
            if kind == "tools":
                bad = tools_item_problem(row)
                if bad:
                    return f"{path}:{i}: evaluate.sets.{name}: {bad}"
                halves.add(bool(row["expected"]))
            if kind == "rag" and (problem := _rag_problem(row)):
                return f"{path}:{i}: evaluate.sets.{name}: {problem}; expected e.g. {EXAMPLES[kind]}"
    if n == 0:
        return f"{path}:1: evaluate.sets.{name}: the file has no items"
    if kind == "tools" and halves != {True, False}:
        has = "calls" if True in halves else "no call"
        return (f"{path}: evaluate.sets.{name}: a tools set needs items that expect calls and items that expect "
                f"none (expected: []); every item here expects {has}")
    return None


def tools_item_problem(row: dict) -> str | None:
    """What is wrong with one tools-set item (stagewise/tools.py reads it), or None."""
    from stagewise.tools import ToolError, as_call, tool_specs

    msgs = row.get("messages")
    roles = [m.get("role") for m in msgs] if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs) else None
    if roles not in (["user"], ["system", "user"]) or not all(isinstance(m.get("content"), str) for m in msgs):
        return ("messages must be the prompt: an optional system turn and one user turn, each with string content "
                f"(got roles {roles})")
    if not isinstance(row.get("expected"), list):
        return "expected must be a list of calls [{\"name\": ..., \"arguments\": {...}}], or [] when no tool fits"
    try:
        specs = tool_specs(row.get("tools"))
        for c in row["expected"]:
            call = as_call(c)
            if call["name"] not in specs:
                return f"expected calls {call['name']!r}, which the item's tools do not declare"
    except ToolError as e:
        return e.problem
    return None


def tools_rows(path: Path) -> list[dict]:
    """A tools set as the flat rows its lm-eval tasks read: the prompt's system turn in the plain
    rendering (schemas after the item's own system text) and its user turn; tools and expected as JSON
    strings (Arrow would otherwise merge every item's schemas into one struct, nulls added)."""
    from stagewise.records import read_jsonl
    from stagewise.tools import tools_system

    out = []
    for i, row in enumerate(read_jsonl(path)):
        msgs = row["messages"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        out.append({"id": str(row.get("id", i)), "system": tools_system(row["tools"], system),
                    "user": msgs[-1]["content"], "tools": json.dumps(row["tools"], ensure_ascii=False),
                    "expected": json.dumps(row["expected"], ensure_ascii=False)})
    return out


def _rag_problem(row: Any) -> str | None:
    from stagewise.rag import RagProblem, check_rag

    try:
        check_rag(row if isinstance(row, dict) else {})
    except RagProblem as p:
        return f"{p.problem} ({p.fix})"
    return None


def _prompt_field(path: Path, kind: str) -> str | None:
    spec = KINDS[kind]
    if "prompt" not in spec:
        return None
    if path.is_file():
        with path.open() as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return next((k for k in spec["prompt"] if k in row), spec["prompt"][0])
    return spec["prompt"][0]


# ---------------------------------------------------------------- compiler
def qa_prompt(field: str) -> dict[str, Any]:
    """How a qa/verifiable item becomes the model's prompt: the question alone, sent through the model's
    own chat template (lm-eval's --apply_chat_template; `metadata.chat_template`). The one place that
    renders chat prompts for declared sets."""
    return {"doc_to_text": "{{" + field + "}}", "metadata": {"version": 1.0, "chat_template": True}}


def _data(path: str) -> dict[str, Any]:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test"}


def _extract(take: dict) -> list[dict]:
    return [{"name": "extract", "filter": [
        {"function": "regex", "regex_pattern": ANSWER_REGEX, "group_select": 0, "fallback": "[invalid]"}, take]}]


def compile_set(name: str, path: str, kind: str) -> dict[str, dict[str, Any]]:
    """One declared set → {lm-eval task name: task config}; the demo sets compile to evals/*.yaml exactly."""
    p = Path(path)
    if kind not in KINDS:
        raise EvalSetError(f"unknown evaluation set kind {kind!r}; one of {', '.join(KINDS)}")
    if kind == "text":
        return {name: {"task": name, **_data(path), "output_type": "loglikelihood_rolling", "doc_to_text": "",
                       "doc_to_target": "{{text}}", "metric_list": [
                           {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                           {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
                       "metadata": {"version": 1.0, "chat_template": False}}}
    if kind == "mc":
        return {name: {"task": name, **_data(path), "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                       "doc_to_choice": "{{choices}}", "doc_to_target": "gold", "target_delimiter": " ",
                       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                       {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
                       "metadata": {"version": 1.0, "chat_template": False}}}
    if kind == "pairs":
        return {name: {"task": name, **_data(path), "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
                       "doc_to_choice": "{{[chosen, rejected]}}", "doc_to_target": 0, "target_delimiter": "",
                       "process_results": "!function utils.preference_results",
                       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                       {"metric": "margin", "aggregation": "mean", "higher_is_better": True}],
                       "metadata": {"version": 1.0, "chat_template": True}}}
    if kind == "tools":
        return compile_tools(name, path)
    if kind == "rag":
        return compile_rag(name, path)
    prompt = qa_prompt(_prompt_field(p, kind))
    greedy = {"until": ["\n"], "max_gen_toks": 24, "do_sample": False}
    if kind == "qa":
        return {name: {"task": name, **_data(path), "output_type": "generate_until", **prompt,
                       "doc_to_target": "{{answer}}", "target_delimiter": "", "generation_kwargs": greedy,
                       "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                    {"function": "take_first"}]}],
                       "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                        "ignore_case": True, "ignore_punctuation": True},
                                       {"metric": "!function utils.token_f1", "aggregation": "mean",
                                        "higher_is_better": True}]}}
    if kind == "verifiable":
        base = {**_data(path), "output_type": "generate_until", **prompt, "doc_to_target": "{{answer}}",
                "target_delimiter": ""}
        return {
            name: {"task": name, **base, "generation_kwargs": greedy,
                   "filter_list": _extract({"function": "take_first"}),
                   "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
            f"{name}_sampled": {"task": f"{name}_sampled", **base, "repeats": SAMPLES,
                                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": True,
                                                      "temperature": 1.0, "top_k": 0, "top_p": 1.0},
                                "filter_list": _extract({"function": "take_first_k", "k": SAMPLES}),
                                "process_results": "!function utils.sampled_pass1",
                                "metric_list": [{"metric": "pass1", "aggregation": "mean", "higher_is_better": True}]},
        }
    raise AssertionError(kind)


def compile_tools(name: str, path: str) -> dict[str, dict[str, Any]]:
    """A tools set (its flat rows, `tools_rows`) → two tasks over disjoint items: `<name>` (items that
    expect calls: call_accuracy, parse_rate, name_accuracy) and `<name>_irrelevance` (expected []:
    irrelevance_accuracy). The prompt is the system turn (tool schemas) and the user turn, sent through
    the model's chat template; the reply is read by stagewise/tools.py (evals/utils.py)."""
    base = {**_data(path), "output_type": "generate_until", "description": "{{system}}", "doc_to_text": "{{user}}",
            "doc_to_target": "{{expected}}", "target_delimiter": "",
            # 96: two parallel calls fit, and lm-eval keeps max_length - 96 tokens of prompt (160 on the
            # demo model's 256-token window: its longest tools prompt is ~150)
            "generation_kwargs": {"until": [], "max_gen_toks": 96, "do_sample": False},
            "metadata": {"version": 1.0, "chat_template": True}}
    return {
        name: {"task": name, **base, "process_docs": "!function utils.tools_call_docs",
               "process_results": "!function utils.tools_results",
               "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                               for m in ("call_accuracy", "parse_rate", "name_accuracy")]},
        f"{name}_irrelevance": {"task": f"{name}_irrelevance", **base,
                                "process_docs": "!function utils.tools_irrelevance_docs",
                                "process_results": "!function utils.tools_irrelevance_results",
                                "metric_list": [{"metric": "irrelevance_accuracy", "aggregation": "mean",
                                                 "higher_is_better": True}]},
    }


def compile_rag(name: str, path: str) -> dict[str, dict[str, Any]]:
    """A rag set → two generation tasks over the same questions: the oracle among 4 distractors (`name`)
    and distractors only (`name_no_oracle`); prompts are built by process_docs (evals/utils.py, the
    format of stagewise/rag.py, the one the raft step trains on)."""
    def task(tname: str, docs: str) -> dict[str, Any]:
        return {"task": tname, **_data(path), "output_type": "generate_until", "process_docs": f"!function utils.{docs}",
                "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 64, "do_sample": False},
                "process_results": "!function utils.rag_results",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("token_f1", "exact_match", "quote_valid")],
                "metadata": {"version": 1.0, "chat_template": True}}

    return {name: task(name, "rag_docs"), f"{name}{NO_ORACLE}": task(f"{name}{NO_ORACLE}", "rag_docs_no_oracle")}


class _Dumper(yaml.SafeDumper):
    pass


class _Function(str):
    pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", v))


def _tag_functions(obj):
    if isinstance(obj, dict):
        return {k: _tag_functions(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tag_functions(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("!function "):
        return _Function(obj.split(" ", 1)[1])
    return obj


def helpers_source() -> Path:
    """evals/utils.py: the `!function` metric helpers the compiled YAMLs call (copied beside them)."""
    return Path(__file__).resolve().parents[1] / "evals" / "utils.py"


def write_tasks(p: EvalPlan, out_dir: Path) -> Path:
    """Write every set's lm-eval task YAML (and the helpers they call) into out_dir; returns out_dir.

    Only files whose content changed are rewritten, so concurrent readers never see a half-written YAML.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"utils.py": helpers_source().read_text()}
    for name, spec in p.sets.items():
        data = spec["path"]
        if spec["kind"] == "tools" and Path(spec["path"]).is_file():   # flat rows beside the YAMLs, rebuilt every time
            data = str(out_dir / f"{name}.tools.jsonl")
            files[f"{name}.tools.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                   for r in tools_rows(Path(spec["path"])))
        for task, conf in compile_set(name, data, spec["kind"]).items():
            head = (f"# Compiled by stagewise from evaluate.sets.{name} ({spec['kind']}, {spec['origin']}).\n"
                    f"# Re-run: lm_eval --model hf --model_args pretrained=<model folder> --include_path {out_dir} "
                    f"--tasks {task}{' --apply_chat_template' if conf.get('metadata', {}).get('chat_template') else ''}\n")
            files[f"{task}.yaml"] = head + yaml.dump(_tag_functions(conf), Dumper=_Dumper, sort_keys=False)
    for fname, text in files.items():
        f = out_dir / fname
        if not f.exists() or f.read_text() != text:
            tmp = f.with_suffix(f.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(f)
    return out_dir


def compiled_dir(p: EvalPlan, root: Path) -> Path:
    """The compiled tasks of a plan, content-addressed under .cache/evalsets/ (shared by runs and the CLI)."""
    key = hashlib.sha256(json.dumps({"sets": p.sets, "helpers": helpers_source().read_text()},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return write_tasks(p, Path(root) / ".cache" / "evalsets" / key)


def copy_to_report(p: EvalPlan, root: Path, run_dir: Path) -> Path:
    """reports/<run>/evals/: the YAMLs this run scored with (absolute data paths), for `lm_eval` re-runs."""
    src = compiled_dir(p, root)
    dst = Path(run_dir) / "evals"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
