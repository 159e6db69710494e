"""Declared evaluation sets: config checks, resolution of targets and general metrics, the lm-eval
compiler, held-out shares, and the loud-numbers warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagewise.config import Config, ConfigError, DecontaminateConfig, load_config
from stagewise.evalsets import EvalSetError, compile_set, plan, write_tasks

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _user_params(tmp_path: Path, extra: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = _jsonl(tmp_path / "src" / "corpus.jsonl", [{"text": f"document {i} " * 30} for i in range(50)])
    chat = _jsonl(tmp_path / "src" / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]}
        for i in range(50)])
    p = tmp_path / "params.yaml"
    p.write_text(f"data:\n  sources:\n    docs: {{path: {src}, kind: corpus}}\n    chats: {{path: src/chat.jsonl, kind: chat}}\n"
                 f"{extra}")
    assert chat
    return p


def test_demo_defaults_are_the_demo_benchmarks():
    p = plan(load_config(ROOT / "params.yaml", "demo"), ROOT)
    assert {n: s["origin"] for n, s in p.sets.items()} == {n: "demo" for n in (
        "sw_general_text", "sw_general_mc", "sw_instruct", "sw_preference", "sw_arithmetic", "sw_arithmetic_unseen",
        "sw_rag")}
    assert {s: m.label for s, m in p.targets.items()} == {
        "pretrain": "sw_general_text.word_perplexity", "sft": "sw_instruct.token_f1",
        "preference": "sw_preference.margin", "reasoning": "sw_arithmetic_sampled.pass1"}
    assert [m.label for m in p.general] == ["sw_general_text.word_perplexity", "sw_general_mc.acc"]
    # reasoning is scored with greedy exact match and the SFT skill beside its target, and on every earlier
    # stage's target (the rulebook keeps them: gate.guard_earlier_targets)
    assert p.stage_tasks("reasoning") == ["sw_arithmetic_sampled", "sw_arithmetic", "sw_instruct",
                                          "sw_general_text", "sw_preference", "sw_general_mc"]
    assert p.stage_tasks("preference") == ["sw_preference", "sw_general_text", "sw_instruct", "sw_general_mc"]
    off = plan(load_config(ROOT / "params.yaml", "demo", ["gate.guard_earlier_targets=false"]), ROOT)
    assert off.stage_tasks("preference") == ["sw_preference", "sw_general_text", "sw_general_mc"]
    # SFT is scored on the open-book set beside its target: with the oracle, distractors only, quotes
    assert [m.label for m in p.context("sft")] == ["sw_rag.token_f1", "sw_rag_no_oracle.token_f1", "sw_rag.quote_valid"]
    assert p.stage_tasks("sft") == ["sw_instruct", "sw_rag", "sw_rag_no_oracle", "sw_general_text", "sw_general_mc"]


def test_user_sources_never_fall_back_to_the_demo(tmp_path):
    # stale demo benchmark files in the workspace must not be picked up
    _jsonl(tmp_path / "data" / "01_raw" / "benchmarks" / "instruct.jsonl", [{"question": "q", "answer": "a"}])
    cfg = load_config(_user_params(tmp_path))
    p = plan(cfg, tmp_path)
    assert set(p.sets) == {"heldout_corpus", "heldout_chat"}
    assert all(s["origin"] == "heldout" for s in p.sets.values())
    assert p.targets["pretrain"].label == "heldout_corpus.word_perplexity"
    assert p.targets["sft"].label == "heldout_chat.token_f1"
    assert "preference" not in p.targets and "reasoning" not in p.targets   # no data of their kind
    assert [m.label for m in p.general] == ["heldout_corpus.word_perplexity"]
    assert p.heldout_kinds() == ["corpus", "chat"]
    assert any("held-out 10%" in n for n in p.notes)


def test_declared_sets_targets_and_metrics(tmp_path):
    qa = _jsonl(tmp_path / "e" / "qa.jsonl", [{"question": "What?", "answer": "That."}])
    txt = _jsonl(tmp_path / "e" / "text.jsonl", [{"text": "Held out."}])
    mc = _jsonl(tmp_path / "e" / "mc.jsonl", [{"context": "a", "choices": ["b", "c"], "gold": 0}])
    cfg = load_config(_user_params(tmp_path, f"""evaluate:
  sets:
    my_qa: {{path: {qa}, kind: qa}}
    my_text: {{path: e/text.jsonl, kind: text}}
    my_mc: {{path: {mc}, kind: mc}}
sft: {{target: my_qa.exact_match}}
"""))
    p = plan(cfg, tmp_path)
    assert p.targets["sft"].label == "my_qa.exact_match" and p.targets["sft"].higher_is_better
    assert p.targets["pretrain"].label == "my_text.word_perplexity" and not p.targets["pretrain"].higher_is_better
    assert p.sets["my_text"]["path"] == txt     # relative to the workspace root
    assert [m.label for m in p.general] == ["my_text.word_perplexity", "my_mc.acc"]
    assert p.heldout_kinds() == []


@pytest.mark.parametrize("extra, expect", [
    ("evaluate:\n  sets:\n    my_qa: {path: e/nothere.jsonl, kind: qa}\n", r"params.yaml:\d+: .*nothere.jsonl: .*no such file"),
    ("evaluate:\n  sets:\n    my_qa: {path: e/bad.jsonl, kind: qa}\n", r"bad.jsonl:2: evaluate.sets.my_qa: missing field\(s\) answer"),
    ("sft: {target: nope}\n", r"params.yaml:\d+: sft.target: 'nope' is not a declared set"),
    ("evaluate:\n  sets:\n    a: {path: e/q.jsonl, kind: qa}\n    b: {path: e/q.jsonl, kind: qa}\n",
     r"sft.target: several qa sets are declared \(a, b\)"),
    ("evaluate:\n  sets:\n    a: {path: e/q.jsonl, kind: qa}\nsft: {target: a.margin}\n", r"a qa set has metrics token_f1, exact_match"),
])
def test_bad_declarations_name_file_and_line(tmp_path, extra, expect):
    _jsonl(tmp_path / "e" / "bad.jsonl", [{"question": "q", "answer": "a"}, {"question": "no answer"}])
    _jsonl(tmp_path / "e" / "q.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=expect):
        load_config(_user_params(tmp_path, extra))


def test_compiled_tasks_load_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    sets = {"t": ("text", {"text": "x"}), "m": ("mc", {"context": "a", "choices": ["b"], "gold": 0}),
            "q": ("qa", {"prompt": "p?", "answer": "a"}), "p": ("pairs", {"prompt": "p", "chosen": "c", "rejected": "r"}),
            "v": ("verifiable", {"question": "1+1?", "answer": "2"})}
    cfg = Config.model_validate({"evaluate": {"sets": {
        n: {"path": _jsonl(tmp_path / f"{n}.jsonl", [row]), "kind": k} for n, (k, row) in sets.items()}}})
    out = write_tasks(plan(cfg, tmp_path), tmp_path / "compiled")
    tm = TaskManager(include_path=str(out), include_defaults=False)
    assert set(tm.all_subtasks) == {"t", "m", "q", "p", "v", "v_sampled"}
    types = {t: tm.task_index[t].cfg["output_type"] for t in tm.all_subtasks}
    assert types == {"t": "loglikelihood_rolling", "m": "multiple_choice", "q": "generate_until",
                     "p": "multiple_choice", "v": "generate_until", "v_sampled": "generate_until"}
    # the prompt field is read from the file: {prompt} for q, {question} for v
    assert tm.task_index["q"].cfg["doc_to_text"] == "{{prompt}}"
    assert tm.task_index["v"].cfg["doc_to_text"] == "{{question}}"
    # absolute data paths: lm_eval can re-run the YAML from any directory
    assert Path(tm.task_index["t"].cfg["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert tm.task_index["v_sampled"].cfg["repeats"] == 8
    assert (out / "utils.py").read_text() == (ROOT / "evals" / "utils.py").read_text()


def test_compile_rejects_unknown_kind():
    with pytest.raises(EvalSetError, match="unknown evaluation set kind"):
        compile_set("x", "/x.jsonl", "essay")


def test_heldout_share_is_stable_when_records_are_added():
    from tasks.decontaminate import heldout_ids

    ids = [str(i) for i in range(2000)]
    first = heldout_ids(ids, 0.1, 1000)
    assert 150 < len(first) < 250                          # about 10%
    more = heldout_ids(ids + ["new-1", "new-2", "new-3"], 0.1, 1000)
    assert set(first) <= set(more) and len(more) - len(first) <= 3
    assert len(heldout_ids(ids, 0.1, 50)) == 50            # capped


def test_decontaminate_holds_out_and_keeps_the_rest_clean(tmp_path):
    from tasks.decontaminate import decontaminate

    text = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door"
    rows = [{"id": str(i), "text": f"{text} number {i}"} for i in range(100)]
    _jsonl(tmp_path / "in" / "corpus.jsonl", rows)
    ref = _jsonl(tmp_path / "ref.jsonl", [{"text": "nothing in common with anything here at all really"}])
    stats = decontaminate(DecontaminateConfig(), tmp_path / "in", [Path(ref)], tmp_path / "out",
                          heldout={"kinds": ["corpus"], "share": 0.1, "max": 200})
    held = [json.loads(x) for x in (tmp_path / "out" / "heldout" / "corpus.jsonl").read_text().splitlines()]
    kept = [json.loads(x) for x in (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()]
    assert held and stats["removed_by_kind"]["corpus"]["heldout_eval"] == len(held)
    # every training document shares a 13-gram with the held-out ones: decontaminated against them
    assert kept == [] and stats["removed_by_kind"]["corpus"]["contaminated"] == 100 - len(held)
    assert {h["id"] for h in held}.isdisjoint({k["id"] for k in kept})


def test_removal_warning_names_top_reasons():
    from stagewise.summary import removal_warnings

    stats = {"quality": {"input": {"corpus": 100, "chat": 100},
                         "removed_by_kind": {"corpus": {"gopher_short_doc": 40, "c4_too_few_sentences": 20,
                                                        "gopher_below_alpha_threshold": 5, "lorem": 1},
                                             "chat": {"chat_truncated": 10}}},
             "decontaminate": {"input": {"chat": 90}, "removed_by_kind": {"chat": {"heldout_eval": 80}}}}
    w = removal_warnings(stats, 0.5)
    assert [(x["step"], x["kind"], x["removed"]) for x in w] == [("quality", "corpus", 66)]
    assert "gopher_short_doc 40, c4_too_few_sentences 20, gopher_below_alpha_threshold 5" in w[0]["message"]


def test_an_appended_source_record_makes_ingest_stale_and_a_fresh_clone_commits(tmp_path, monkeypatch):
    """dvc.yaml tracks data.sources through their content hashes (params.resolved.yaml `inputs:`), and a
    workspace that never generated the demo world (no data/01_raw) can still record its data steps."""
    import yaml

    from conftest import make_workspace
    from stagewise import dvcops
    from stagewise.hashing import input_hashes
    import tasks
    from stagewise.steps import metrics_path
    from stagewise.workspace import Workspace

    ws_root = make_workspace(tmp_path / "ws")
    _user_params(ws_root)          # params.yaml: two sources, one of them by a relative path
    monkeypatch.chdir(ws_root)
    cfg = load_config(ws_root / "params.yaml")
    ws = Workspace.at(ws_root)

    def resolve_and_run() -> None:
        (ws_root / "params.resolved.yaml").write_text(
            yaml.safe_dump({**cfg.to_dict(), "inputs": input_hashes(cfg, ws_root)}, sort_keys=False))
        dvcops.ensure_repo(ws_root)
        ws.raw.mkdir(parents=True, exist_ok=True)    # what start_run does when data.sources is set
        stats = tasks.prefect_task("ingest").fn(**tasks.step("ingest").args(cfg, ws))
        dvcops.commit(ws_root, "ingest", stats, metrics_path(ws, "ingest"))   # raised DependencyDoesNotExist

    resolve_and_run()
    assert "ingest" not in dvcops.stale_stages(ws_root)
    src = tmp_path / "ws" / "src" / "chat.jsonl"      # declared relative to the workspace root
    with src.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "one more?"},
                                         {"role": "assistant", "content": "Yes."}]}) + "\n")
    (ws_root / "params.resolved.yaml").write_text(
        yaml.safe_dump({**cfg.to_dict(), "inputs": input_hashes(cfg, ws_root)}, sort_keys=False))
    assert "ingest" in dvcops.stale_stages(ws_root)
    resolve_and_run()
    assert "one more?" in (ws.ingested / "chat.jsonl").read_text()
    assert "ingest" not in dvcops.stale_stages(ws_root)


def test_the_reports_compiled_tasks_read_the_prompt_field_the_data_has(tmp_path):
    """A fresh run compiles its sets before `generate` writes them (start_run), when a qa/verifiable set's
    prompt field can only be guessed ({{prompt}}); the demo's arithmetic rows say `question`. finish_run
    copies the compiled tasks again, from the data: the report's YAMLs then run with the stock lm_eval."""
    from stagewise.evalsets import copy_to_report, demo_plan

    p = demo_plan(tmp_path)
    run_dir = tmp_path / "reports" / "r1"
    copy_to_report(p, tmp_path, run_dir)
    assert "{{prompt}}" in (run_dir / "evals" / "sw_arithmetic.yaml").read_text()
    _jsonl(Path(p.sets["sw_arithmetic"]["path"]), [{"question": "What is 2 plus 3?", "answer": "5"}])
    copy_to_report(p, tmp_path, run_dir)
    text = (run_dir / "evals" / "sw_arithmetic.yaml").read_text()
    assert "{{question}}" in text and "{{prompt}}" not in text
