"""Ingestion and the standalone `stagewise data curate` CLI on user files, good and bad."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stagewise.cli_data import data_app
from stagewise.config import DataConfig, IngestConfig, SourceConfig
from stagewise.records import BadInput
from tasks.ingest import ingest

WORDS = ("the quick brown fox jumps over the lazy dog and then it runs to the old river where it drinks "
         "some water before the long night falls over the quiet and sleepy village near the hill").split()


def doc(i: int) -> str:
    # two distinct sentences per doc, > 50 words, passes the quality filters
    body = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(30))
    return (f"Document number {i} tells a story. " + body.capitalize() + ". "
            + " ".join(reversed(body.split())) + ". It ends here. That is all for now. Thank you.")


def write(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((l if isinstance(l, bytes) else (json.dumps(l) if not isinstance(l, str) else l).encode()) + b"\n" for l in lines))
    return path


def curate(*args) -> tuple[int, str]:
    r = CliRunner().invoke(data_app, ["curate", *map(str, args)])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def test_cli_on_jsonl_without_ids_numbers_lines_and_reports_every_record(tmp_path):
    texts = [doc(i) for i in range(6)]
    src = write(tmp_path / "in.jsonl", [{"text": t} for t in texts] + [{"text": texts[2]}, {"text": "Buy now!"}])
    code, out = curate("--input", src, "--output", tmp_path / "out" / "clean.jsonl", "--report", tmp_path / "r.json")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    kept = [json.loads(l) for l in (tmp_path / "out" / "clean.jsonl").read_text().splitlines()]
    assert report["input"] == 8 and report["kept"] == 6 == len(kept)
    assert [r["id"] for r in kept] == ["0", "1", "2", "3", "4", "5"]      # 0-based line numbers
    assert report["removed"]["exact_dup"] == ["6"] and report["duplicate_of"] == {"6": "2"}
    assert report["removed"]["gopher_short_doc"] == ["7"]
    removed = [json.loads(l) for l in (tmp_path / "out" / "removed" / "gopher_short_doc.jsonl").read_text().splitlines()]
    assert removed[0]["record"]["text"] == "Buy now!"


def test_cli_keeps_user_ids_and_guesses_the_kind(tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(4)]
    rows.append({"id": "bad", "prompt": "What is two plus two?", "answer": "four"})
    src = write(tmp_path / "v.jsonl", rows)
    code, out = curate("-i", src, "-o", tmp_path / "o.jsonl", "-r", tmp_path / "r.json")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kind"] == "verifiable"
    assert report["removed"] == {"verifiable_answer_unparseable": ["bad"]}
    assert [json.loads(l)["id"] for l in (tmp_path / "o.jsonl").read_text().splitlines()] == ["q0", "q1", "q2", "q3"]


BAD = {
    "malformed JSON": ('{"text": "ok"', "not valid JSON"),
    "missing field": ({"body": "x"}, "missing field 'text'"),
    "wrong type": ({"text": 42}, "field 'text' must be a string"),
    "non-UTF-8 bytes": (b'{"text": "caf\xe9"}', "not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_row_names_file_line_and_fix(tmp_path, case):
    line, problem = BAD[case]
    src = write(tmp_path / "in.jsonl", [{"text": doc(0)}, line, {"text": doc(1)}])
    code, out = curate("-i", src, "-o", tmp_path / "o.jsonl", "-r", tmp_path / "r.json", "--kind", "corpus")
    assert code == 2
    assert f"{src}:2:" in out and problem in out and "fix:" in out
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("case", list(BAD))
def test_cli_quarantine_sets_bad_rows_aside_and_counts_them(tmp_path, case):
    line, _ = BAD[case]
    src = write(tmp_path / "in.jsonl", [{"text": doc(0)}, line, {"text": doc(1)}])
    code, out = curate("-i", src, "-o", tmp_path / "o.jsonl", "-r", tmp_path / "r.json", "--kind", "corpus",
                       "--on-bad-rows", "quarantine")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input"] == 3 and report["kept"] == 2 and report["quarantined"] == 1
    assert sum(report["removed_counts"].values()) == 1
    [entry] = [json.loads(l) for l in Path(report["quarantine"]).read_text().splitlines()]
    assert entry["line"] == 2 and entry["file"] == str(src) and entry["raw"]


def test_cli_empty_file_stops_even_with_quarantine(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    for mode in ("fail", "quarantine"):
        code, out = curate("-i", src, "-o", tmp_path / "o.jsonl", "-r", tmp_path / "r.json", "--kind", "corpus",
                           "--on-bad-rows", mode)
        assert code == 2 and f"{src}:1" in out and "empty" in out and "fix:" in out


def test_duplicate_ids_are_bad_rows(tmp_path):
    src = write(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    cfg = DataConfig(sources={"s": SourceConfig(path=str(src), kind="corpus")})
    with pytest.raises(BadInput, match="already used"):
        ingest(cfg, IngestConfig(), tmp_path, tmp_path / "out")
    stats = ingest(cfg.model_copy(update={"on_bad_rows": "quarantine"}), IngestConfig(), tmp_path, tmp_path / "out")
    assert stats["kept"] == {"corpus": 1} and stats["removed"] == {"duplicate_id": 1}


def test_ingest_reads_parquet_text_folders_and_saved_datasets(tmp_path):
    import datasets
    import pandas as pd

    pd.DataFrame({"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"]}).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "one.txt").write_text("first document")
    (tmp_path / "txt" / "two.txt").write_text("second document")
    datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]],
                                "content": ["unused"]}).save_to_disk(str(tmp_path / "hf"))
    write(tmp_path / "v.jsonl", [{"question": "1+1?", "answer": 2}])
    cfg = DataConfig(sources={
        "pref": SourceConfig(path=str(tmp_path / "p.parquet"), format="parquet", kind="preference"),
        "docs": SourceConfig(path=str(tmp_path / "txt"), format="text", kind="corpus"),
        "chat": SourceConfig(path=str(tmp_path / "hf"), format="hf_disk", kind="chat"),
        "ver": SourceConfig(path=str(tmp_path / "v.jsonl"), kind="verifiable", columns={"prompt": "question"}),
    })
    stats = ingest(cfg, IngestConfig(), tmp_path, tmp_path / "out")
    assert stats["kept"] == {"preference": 2, "corpus": 2, "chat": 1, "verifiable": 1}
    read = lambda k: [json.loads(l) for l in (tmp_path / "out" / f"{k}.jsonl").read_text().splitlines()]
    assert [r["id"] for r in read("preference")] == ["0", "1"]
    assert {r["id"]: r["text"] for r in read("corpus")} == {"one.txt": "first document", "two.txt": "second document"}
    assert read("chat")[0]["messages"][1]["content"] == "hello."
    assert read("verifiable")[0] == {"id": "0", "prompt": "1+1?", "answer": "2"}   # mapped column, number -> string


def test_cli_module_imports_no_heavy_library():
    import subprocess
    import sys

    # module import must not pull GX / datatrove / datasets (the lead's `stagewise --help` < 1 s)
    out = subprocess.run([sys.executable, "-c", "import sys, stagewise.cli_data; "
                          "print(sorted(m for m in ('great_expectations', 'datatrove', 'datasets', 'pandas') if m in sys.modules))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    assert out == "[]"


def test_cli_decontaminates_with_benchmarks_and_refuses_without(tmp_path):
    bench = write(tmp_path / "bench.jsonl", [{"id": "b1", "question": "What color is the small red fox in the story?"}])
    src = write(tmp_path / "v.jsonl", [{"prompt": "What color is the small red fox in the story?", "answer": "1"},
                                       {"prompt": "How many legs does a spider have?", "answer": "8"}])
    code, out = curate("-i", src, "-o", tmp_path / "o.jsonl", "-r", tmp_path / "r.json", "--steps", "decontaminate")
    assert code == 2 and "--benchmark" in out
    code, out = curate("-i", src, "-o", tmp_path / "o.jsonl", "-r", tmp_path / "r.json", "-b", bench)
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["contaminated"] == {"0": "bench:b1"} and report["removed"] == {"contaminated": ["0"]}


def test_hub_source_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(sources={"hub": SourceConfig(path="nobody/no-such-dataset", format="hf_hub", kind="corpus")})
    with pytest.raises(BadInput, match="save_to_disk"):
        ingest(cfg, IngestConfig(), tmp_path, tmp_path / "out")


def test_prefect_tasks_are_named_after_their_steps():
    from tasks import decontaminate, dedup, ingest as ingest_mod, quality, validate

    for mod, step in ((ingest_mod, "ingest"), (quality, "quality"), (dedup, "dedup"),
                      (decontaminate, "decontaminate"), (validate, "validate")):
        t = getattr(mod, f"{step}_task")
        assert t.name == step and t.retries == 1


def test_the_same_data_in_two_clones_hashes_the_same(tmp_path):
    """Ingest's outputs are DVC-tracked: nothing in them may depend on where the workspace lives."""
    from stagewise.hashing import dir_hash
    import tasks
    from stagewise.workspace import Workspace
    from stagewise.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", "smoke")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_bad_rows": "quarantine"})})
    hashes = []
    for clone in ("a", "elsewhere/b"):
        ws = Workspace.at(tmp_path / clone)
        ws.raw.mkdir(parents=True)
        write(ws.raw / "corpus.jsonl", [{"text": doc(i)} for i in range(3)] + [b"{not json"])
        stats = tasks.prefect_task("ingest").fn(**tasks.step("ingest").args(cfg, ws))
        assert stats["files"] == {"corpus": ["data/01_raw/corpus.jsonl"]} and stats["quarantined"] == {"corpus": 1}
        assert str(tmp_path) not in "".join(p.read_text() for p in ws.ingested.rglob("*") if p.is_file())
        hashes.append(dir_hash(ws.ingested))
    assert hashes[0] == hashes[1]
