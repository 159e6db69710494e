"""ingest — read every source into normalized `<kind>.jsonl` records with string ids.

Sources are JSONL, Parquet, plain-text files (one document per file), `datasets` folders saved with
`save_to_disk`, or hub datasets (network only). A record's `id` is optional: without one it is the
0-based line (row) number, as a string. A bad row (malformed JSON, missing field, wrong type,
non-UTF-8 bytes, duplicate id) stops the step with an error naming file, line and fix; with
`data.on_bad_rows: quarantine` it goes to `quarantine/<kind>.jsonl` and is counted under its
reason code instead. An empty file always stops the step. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from prefect import task

from stagewise.config import DataConfig, IngestConfig, SourceConfig
from stagewise.records import BadInput, BadRow, StepOutput, check_record, progress
from stagewise.workspace import KINDS

BAD_ROW_CODES = ("bad_json", "bad_utf8", "missing_field", "wrong_type", "duplicate_id")
# chat records that use tools (stagewise/tools.py: check_chat)
TOOL_ROW_CODES = ("tool_bad_schema", "tool_bad_call", "tool_undeclared", "tool_bad_arguments", "tool_unmatched_result")
_SUFFIX = {"jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",), "text": (".txt", ".md")}
_SUFFIX["auto"] = tuple(x for v in _SUFFIX.values() for x in v)   # a mixed folder: each file by its suffix


def ingest(data_cfg: DataConfig, cfg: IngestConfig, raw_dir: Path, out_dir: Path, root: Path | None = None) -> dict:
    """Read the configured sources (or raw_dir/<kind>.jsonl) into out_dir/<kind>.jsonl.

    Source files are recorded (stats.json, quarantine rows) relative to `root`, the workspace, when
    they lie inside it: the outputs are DVC-tracked, and the same data must hash the same in any clone.
    """
    raw_dir, out = Path(raw_dir), StepOutput("ingest", out_dir)
    sources = _sources(data_cfg, raw_dir, root)
    quarantine: dict[str, list[dict]] = {}
    files: dict[str, list[str]] = {}
    per_file: dict[str, int] = {}   # records read from each file: a file skipped would show as missing
    blank_lines = 0
    ids_of: dict[str, dict[str, str]] = {}
    for kind, src in sources:
        kept, seen_ids = out.kept.setdefault(kind, []), ids_of.setdefault(kind, {})
        files.setdefault(kind, [])
        # without an id field a record is numbered by its 0-based line; with several files the file
        # name goes in front so ids stay unique
        multi = src.format in ("jsonl", "parquet", "text", "auto") and len(_files(src)) > 1
        for file, line, value in progress(_rows(src), f"ingest {kind}"):
            file = _shown(file, root)
            if file not in files[kind]:
                files[kind].append(file)
            if value is None:  # a blank line: not a record, but counted
                blank_lines += 1
                continue
            out.input[kind] += 1
            per_file[file] = per_file.get(file, 0) + 1
            try:
                if isinstance(value, BadRow):
                    raise value
                default_id = f"{Path(file).name}:{line}" if multi else str(line)
                rec = check_record(kind, _rename(value, src.columns), default_id=default_id)
                if rec["id"] in seen_ids:
                    raise BadRow("duplicate_id", f"id {rec['id']!r} is already used ({seen_ids[rec['id']]})",
                                 "give every record a unique id, or drop the id field to number records by line")
            except BadRow as bad:
                if data_cfg.on_bad_rows == "fail":
                    raise BadInput(file, line + 1, bad.problem,
                                   bad.fix + " (or set data.on_bad_rows: quarantine / --on-bad-rows quarantine)",
                                   code=bad.code) from None
                raw = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
                if isinstance(value, BadRow):
                    raw = getattr(value, "raw", "")
                entry = {"file": file, "line": line + 1, "reason": bad.code, "problem": bad.problem,
                         "fix": bad.fix, "raw": raw[: cfg.max_quarantine_chars]}
                quarantine.setdefault(kind, []).append(entry)
                out.remove(kind, None, bad.code, rid=f"{file}:{line + 1}", problem=bad.problem)
                continue
            seen_ids[rec["id"]] = f"{file}:{line + 1}"
            kept.append(rec)
    from stagewise.records import write_jsonl

    for kind, rows in quarantine.items():
        write_jsonl(out.out_dir / "quarantine" / f"{kind}.jsonl", rows)
    # removed/<code>.jsonl duplicates the quarantine rows' ids; the quarantine file holds the raw text
    return out.finish(files=files, records_per_file=per_file, blank_lines=blank_lines,
                      quarantined={k: len(v) for k, v in quarantine.items()},
                      on_bad_rows=data_cfg.on_bad_rows)


def _shown(file: str, root: Path | None) -> str:
    if root is None:
        return file
    try:
        return Path(file).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:  # outside the workspace: as configured
        return file


def _sources(data_cfg: DataConfig, raw_dir: Path, root: Path | None = None) -> list[tuple[str, SourceConfig]]:
    if data_cfg.sources:
        # relative paths resolve against the workspace root (the folder of params.yaml), not the cwd
        def resolved(s: SourceConfig) -> SourceConfig:
            p = Path(s.path).expanduser()
            if root is None or s.format == "hf_hub" or p.is_absolute():
                return s
            return s.model_copy(update={"path": str(Path(root) / p)})

        return [(s.kind, resolved(s)) for s in data_cfg.sources.values()]
    found = [(k, SourceConfig(path=str(raw_dir / f"{k}.jsonl"), kind=k)) for k in KINDS
             if (raw_dir / f"{k}.jsonl").exists()]
    if not found:
        raise BadInput(raw_dir, None, f"no {'/'.join(f'{k}.jsonl' for k in KINDS)} here",
                       "run the `generate` step for the demo world, or list your files under data.sources in params.yaml")
    return found


def _rename(value: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(value, dict):
        return value
    value = dict(value)
    for ours, theirs in columns.items():
        if theirs in value and ours not in value:
            value[ours] = value.pop(theirs)
    return value


def _files(src: SourceConfig) -> list[Path]:
    path = Path(src.path).expanduser()
    if not path.exists():
        raise BadInput(path, None, "no such file or folder", f"check data.sources path for this {src.kind} source")
    if path.is_file():
        return [path]
    every = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    files = [p for p in every if p.suffix.lower() in _SUFFIX[src.format]]
    others = [p for p in every if p not in files]
    if others:  # never skip a file silently: read the folder whole, or refuse it
        names = ", ".join(str(p.relative_to(path)) for p in others[:10]) + (" ..." if len(others) > 10 else "")
        readable = ", ".join(_SUFFIX["auto"])
        raise BadInput(path, None, f"the folder holds {len(others)} file(s) that format {src.format} does not read: "
                       f"{names}",
                       f"move them out (readable: {readable})" if src.format == "auto" else
                       f"move them out, or set the source's format to auto (each file by its suffix: {readable})")
    if not files:
        raise BadInput(path, None, f"folder has no {'/'.join(_SUFFIX[src.format])} files",
                       "point the source at a file, or at a folder of such files, or set its format")
    return files


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _rows(src: SourceConfig) -> Iterator[tuple[str, int, Any]]:
    """(file, 0-based line or row, parsed object | BadRow | None for a blank line)."""
    if src.format == "auto":
        for f in _files(src):
            fmt = next(k for k in ("jsonl", "parquet", "text") if f.suffix.lower() in _SUFFIX[k])
            if fmt == "text":
                if src.kind != "corpus":
                    raise BadInput(f, None, f"a plain-text file holds a corpus document, not a {src.kind} record",
                                   "move it out of the folder, or curate it separately with --kind corpus")
                yield from _text_rows(src.model_copy(update={"path": str(f), "format": "text"}))
            else:
                yield from (_jsonl_rows(f) if fmt == "jsonl" else _parquet_rows(f))
    elif src.format == "jsonl":
        for f in _files(src):
            yield from _jsonl_rows(f)
    elif src.format == "parquet":
        for f in _files(src):
            yield from _parquet_rows(f)
    elif src.format == "text":
        if src.kind != "corpus":
            raise BadInput(src.path, None, f"plain-text files hold corpus documents, not {src.kind} records",
                           "use format jsonl or parquet for this kind")
        yield from _text_rows(src)
    else:
        yield from _hf_rows(src)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    n_records = 0
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not an error
            if not raw.strip():
                yield str(path), i, None
                continue
            n_records += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = BadRow("bad_utf8", f"bytes that are not UTF-8 at column {e.start + 1} ({raw[e.start:e.start + 4]!r})",
                             "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl)")
                bad.raw = raw.decode("utf-8", "backslashreplace")  # type: ignore[attr-defined]
                yield str(path), i, bad
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                bad = BadRow("bad_json", f"not valid JSON ({e.msg} at column {e.colno})",
                             "write exactly one JSON object per line (JSON Lines); check quotes, commas and brackets")
                bad.raw = text.rstrip("\n")  # type: ignore[attr-defined]
                yield str(path), i, bad
                continue
            except RecursionError:
                bad = BadRow("bad_json", "nested too deeply to read (brackets inside brackets, past Python's limit)",
                             "flatten the record: one JSON object per line with string fields")
                bad.raw = text[:2000]  # type: ignore[attr-defined]
                yield str(path), i, bad
                continue
            if "\\ud" in text or "\\uD" in text:  # only a \u escape can make a lone surrogate
                surrogate = _lone_surrogate(text, obj)
                if surrogate:
                    bad = BadRow("bad_utf8", f"a lone UTF-16 surrogate escape {surrogate} (not a character; "
                                 "it cannot be written as UTF-8)",
                                 "remove the escape, or write the character itself (or both halves of its pair)")
                    bad.raw = text.rstrip("\n")  # type: ignore[attr-defined]
                    yield str(path), i, bad
                    continue
            yield str(path), i, obj
    if n_records == 0:
        raise BadInput(path, 1, "the file is empty (no records)",
                       "point the source at a file with at least one JSON object per line, or remove it")


def _lone_surrogate(text: str, obj: Any) -> str | None:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return "\\u%04x" % ord(e.object[e.start])


def _parquet_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a broken file
        raise BadInput(path, None, f"not a readable Parquet file ({e})", "check the file, or set format: jsonl") from None
    if pf.metadata.num_rows == 0:
        raise BadInput(path, 1, "the file is empty (no rows)", "point the source at a file with at least one row")
    i = 0
    for batch in pf.iter_batches(batch_size=10_000):
        for row in batch.to_pylist():
            yield str(path), i, row
            i += 1


def _text_rows(src: SourceConfig) -> Iterator[tuple[str, int, Any]]:
    path = Path(src.path).expanduser()
    for i, f in enumerate(_files(src)):
        data = f.read_bytes()
        if not data.strip():
            raise BadInput(f, 1, "the file is empty", "remove it, or point the source at a folder of non-empty .txt files")
        rid = str(f.relative_to(path)) if path.is_dir() else f.name
        try:
            yield str(f), 0, {"id": rid, "text": data.decode("utf-8")}
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n")
            bad = BadRow("bad_utf8", f"bytes that are not UTF-8 (line {line + 1}, byte {e.start})",
                         "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            bad.raw = data.decode("utf-8", "backslashreplace")  # type: ignore[attr-defined]
            yield str(f), line, bad


def _hf_rows(src: SourceConfig) -> Iterator[tuple[str, int, Any]]:
    import datasets

    try:
        if src.format == "hf_disk":
            ds = datasets.load_from_disk(src.path)
        else:
            ds = datasets.load_dataset(src.path, split=src.split or "train")
    except Exception as e:  # noqa: BLE001 -- datasets raises many types; the message is what matters
        fix = ("hub datasets need network; save it once with Dataset.save_to_disk and use format: hf_disk"
               if src.format == "hf_hub" else "point the source at a folder written by Dataset.save_to_disk")
        raise BadInput(src.path, None, f"could not load the dataset ({type(e).__name__}: {e})", fix) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = [src.split] if src.split else list(ds.keys())
        parts = [(f"{src.path}[{s}]", ds[s]) for s in splits]
    else:
        parts = [(src.path, ds)]
    offset = 0
    for name, part in parts:
        if len(part) == 0:
            raise BadInput(name, 1, "the dataset split is empty", "pick a non-empty split with data.sources.<name>.split")
        for i, row in enumerate(part):
            # ids default to the row number across splits, so they stay unique
            yield name, offset + i, row
        offset += len(part)


@task(name="ingest", retries=1)
def ingest_task(data_cfg: DataConfig, cfg: IngestConfig, raw_dir: Path, out_dir: Path,
                root: Path | None = None) -> dict:
    """Read raw sources into normalized records; quarantine or reject bad rows."""
    return ingest(data_cfg, cfg, raw_dir, out_dir, root)
