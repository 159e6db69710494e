"""`stagewise data curate`: the curation steps on any file, outside the pipeline.

    stagewise data curate --input my.jsonl --output clean.jsonl --report report.json \
        [--kind corpus|chat|preference|verifiable] [--steps quality,dedup,decontaminate] \
        [--benchmark evals.jsonl ...] [--on-bad-rows fail|quarantine] [--config params.yaml]

Beside the output: removed/<reason>.jsonl (every removed record with its reason) and, with
--on-bad-rows quarantine, quarantine/<kind>.jsonl. REPORT.json: docs/data.md#report.
Heavy imports live inside the command: `stagewise --help` must stay instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(help="Data curation on any file: quality filters, dedup, decontamination.",
                       no_args_is_help=True)

STEPS = ("quality", "dedup", "decontaminate")


@data_app.callback()
def _data() -> None:
    """Data curation on any file: quality filters, dedup, decontamination."""


@data_app.command()
def curate(
    input: Path = typer.Option(..., "--input", "-i", help="JSONL / Parquet file, a folder of them, a .txt folder, or a save_to_disk folder"),
    output_arg: str = typer.Option(..., "--output", "-o", help="curated records: a JSONL file, or a folder "
                                   "(an existing one, a path ending in /, or the folder --report goes into)"),
    report: Path = typer.Option(..., "--report", "-r", help="REPORT.json: counts, removed ids per reason, duplicate_of"),
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="corpus | chat | preference | verifiable (default: guessed from the first record)"),
    steps: Optional[str] = typer.Option(None, "--steps", help="comma-separated subset of quality,dedup,decontaminate (default: quality,dedup, plus decontaminate with --benchmark)"),
    benchmark: Optional[list[Path]] = typer.Option(None, "--benchmark", "-b", help="eval set JSONL to decontaminate against (repeatable)"),
    on_bad_rows: str = typer.Option("fail", "--on-bad-rows", help="fail: stop at the first bad row; quarantine: set it aside and count it"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="params.yaml whose quality/dedup/decontaminate sections to use (default: built-in defaults)"),
) -> None:
    """Curate one file: ingest (schema check), quality filters, dedup, decontamination."""
    import contextlib
    import os
    import shutil
    import tempfile

    from stagewise.config import Config, ConfigError, DataConfig, SourceConfig, load_config
    from stagewise.records import BadInput, read_jsonl, removed_ids, write_json, write_jsonl

    def fail(msg: str) -> None:
        from stagewise.errors import one_line

        typer.echo(f"error: {one_line(msg)}", err=True)
        raise typer.Exit(2)

    if kind is not None and kind not in ("corpus", "chat", "preference", "verifiable", "rag"):
        fail(f"--kind {kind!r}: use one of corpus, chat, preference, verifiable, rag")
    if on_bad_rows not in ("fail", "quarantine"):
        fail(f"--on-bad-rows {on_bad_rows!r}: use fail or quarantine")
    chosen = [s.strip() for s in steps.split(",") if s.strip()] if steps else \
        ["quality", "dedup"] + (["decontaminate"] if benchmark else [])
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        fail(f"--steps: unknown step(s) {', '.join(unknown)}; choose from {','.join(STEPS)}")
    if "decontaminate" in chosen and not benchmark:
        fail("--steps decontaminate needs the eval sets: pass --benchmark FILE.jsonl (repeatable)")
    if not input.exists():
        fail(f"{input}: no such file or folder")
    output = Path(output_arg)
    # `-o curated/ -r curated/report.json`: a folder, though it does not exist yet (Path drops the "/")
    as_folder = output.is_dir() or output_arg.endswith(("/", os.sep)) or output.resolve() in report.resolve().parents
    if as_folder and output.exists() and not output.is_dir():
        fail(f"--output {output_arg}: {output} is a file, not a folder: remove it or write elsewhere")
    blocking = next((p for p in report.resolve().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        fail(f"--report {report}: {blocking} is a file, not a folder: remove it or write the report elsewhere")
    out_file = output / "x.jsonl" if as_folder else output
    src, dst = input.resolve(), out_file.resolve()
    if dst == src or (src.is_dir() and src in dst.parents) or report.resolve() == src:
        fail(f"--output {output} would overwrite or land inside the input {input}: write the curated "
             "records somewhere else (e.g. -o curated/)")
    try:
        cfg = load_config(config) if config else Config()
    except ConfigError as e:
        fail(str(e))

    fmt = _format_of(input)
    try:
        kind = kind or _guess_kind(input, fmt)
    except BadInput as e:
        fail(str(e))
    if kind is None:
        fail(f"{input}: cannot tell the record kind from the first record; pass --kind corpus|chat|preference|verifiable")

    if as_folder:  # a folder: the curated file goes inside it
        output = output / f"{kind}.jsonl"

    from tasks.decontaminate import decontaminate
    from tasks.dedup import dedup
    from tasks.ingest import ingest
    from tasks.quality import quality

    work = Path(tempfile.mkdtemp(prefix="stagewise-curate-"))
    out_dir = output.parent
    made = [p for p in [out_dir, *out_dir.parents] if not p.exists()]   # removed again on failure
    out_dir.mkdir(parents=True, exist_ok=True)
    done = False
    # Everything is written here first and moved into place only once complete: a curate that fails
    # (bad row, full disk) leaves no output, no partial removed/ file, no report.
    stage = Path(tempfile.mkdtemp(prefix=".curate-", dir=out_dir))
    try:
        data_cfg = DataConfig(sources={"input": SourceConfig(path=str(input), format=fmt, kind=kind)},
                              on_bad_rows=on_bad_rows)
        stats = {}
        try:
            stats["ingest"] = ingest(data_cfg, cfg.ingest, input.parent, work / "ingest")
        except BadInput as e:
            fail(str(e))
        prev = work / "ingest"
        for step in STEPS:
            if step not in chosen:
                continue
            nxt = work / step
            try:
                if step == "quality":
                    stats[step] = quality(cfg.quality, prev, nxt)
                elif step == "dedup":
                    stats[step] = dedup(cfg.dedup, prev, nxt)
                else:
                    stats[step] = decontaminate(cfg.decontaminate, prev, list(benchmark or []), nxt)
            except BadInput as e:
                fail(str(e))
            prev = nxt

        n_kept = write_jsonl(stage / output.name,
                             read_jsonl(prev / f"{kind}.jsonl") if (prev / f"{kind}.jsonl").exists() else [])
        removed: dict[str, list[str]] = {}
        publish = [(stage / output.name, output)]
        for step in ["ingest", *[s for s in STEPS if s in chosen]]:
            for reason, ids in removed_ids(work / step).items():
                removed.setdefault(reason, []).extend(ids)
                (stage / "removed").mkdir(exist_ok=True)
                shutil.copyfile(work / step / "removed" / f"{reason}.jsonl", stage / "removed" / f"{reason}.jsonl")
                publish.append((stage / "removed" / f"{reason}.jsonl", out_dir / "removed" / f"{reason}.jsonl"))
        quarantine = None
        if (work / "ingest" / "quarantine" / f"{kind}.jsonl").exists():
            quarantine = out_dir / "quarantine" / f"{kind}.jsonl"
            (stage / "quarantine").mkdir(exist_ok=True)
            shutil.copyfile(work / "ingest" / "quarantine" / f"{kind}.jsonl", stage / "quarantine" / f"{kind}.jsonl")
            publish.append((stage / "quarantine" / f"{kind}.jsonl", quarantine))
        n_input = stats["ingest"]["input"].get(kind, 0)
        result = {
            "kind": kind,
            "input": n_input,
            "kept": n_kept,
            "steps": ["ingest", *[s for s in STEPS if s in chosen]],
            "removed": removed,
            "removed_counts": {r: len(ids) for r, ids in removed.items()},
            "duplicate_of": stats.get("dedup", {}).get("duplicate_of", {}).get(kind, {}),
            "contaminated": stats.get("decontaminate", {}).get("contaminated", {}).get(kind, {}),
            "edited": stats.get("quality", {}).get("edited", {}),
            "quarantined": stats["ingest"]["quarantined"].get(kind, 0),
            "quarantine": str(quarantine) if quarantine else None,
            "output": str(output),
            "funnel": [{"step": s, "kept": stats[s]["kept"].get(kind, 0)} for s in stats],
            "files": stats["ingest"].get("records_per_file", {}),   # records read from each input file
        }
        assert n_input == n_kept + sum(len(v) for v in removed.values()), "a record went missing"  # never silent
        write_json(stage / ".report.json", result)
        # all written: move into place (renames need no space; the report goes last)
        for tmp, dest in publish:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        report.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(stage / ".report.json", report)
        except OSError:  # another file system: write_json is atomic on its own
            write_json(report, result)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        for p in made if not done else []:
            with contextlib.suppress(OSError):   # only folders this run created, only if left empty
                p.rmdir()
    summary = ", ".join(f"{r} {len(ids)}" for r, ids in sorted(removed.items())) or "nothing"
    typer.echo(f"{kind}: {n_input} in, {n_kept} kept; removed: {summary}\nreport: {report}")


def _format_of(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf_disk"
        # every file by its own suffix; ingest refuses the folder naming any file it cannot read
        return "auto"
    return {".parquet": "parquet", ".txt": "text", ".md": "text"}.get(path.suffix.lower(), "jsonl")


def _guess_kind(path: Path, fmt: str) -> str | None:
    """The kind the first readable record looks like."""
    from stagewise.config import SourceConfig
    from stagewise.records import detect_kind
    from tasks.ingest import _rows

    if fmt == "text":
        return "corpus"
    if fmt == "auto":
        from tasks.ingest import _SUFFIX, _files

        if all(f.suffix.lower() in _SUFFIX["text"] for f in _files(SourceConfig(path=str(path), format=fmt,
                                                                               kind="corpus"))):
            return "corpus"
    for _, _, value in _rows(SourceConfig(path=str(path), format=fmt, kind="corpus")):
        if isinstance(value, dict):
            return detect_kind(value)
    return None
