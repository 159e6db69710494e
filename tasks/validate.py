"""validate — Great Expectations suites over the curated records; Data Docs HTML for people.

One suite per record kind (schema, non-null, length bounds, unique ids, role order in messages,
chosen != rejected, answer parses), run through a GX Checkpoint whose UpdateDataDocsAction builds
Data Docs under out_dir/data_docs/. Expectations carry GX severities: a failed `critical` one stops
the flow with ValidationFailed (a readable list of what failed, with examples); `warning` ones are
reported only. Validation removes nothing: it is a gate on what the earlier steps produced.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task

from stagewise.config import ValidateConfig
from stagewise.errors import UserError
from stagewise.records import input_kinds, read_jsonl, write_json
from stagewise.tools import language_turns


class ValidationFailed(UserError, RuntimeError):
    """Curated data broke a critical expectation; the message lists each failure with examples (exit 2)."""


def validate(cfg: ValidateConfig, in_dir: Path, out_dir: Path) -> dict:
    """Run a GX suite per kind on in_dir/<kind>.jsonl; results + Data Docs to out_dir."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # slow import (~5-10 s): only here

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "data_docs"
    if docs_dir.is_dir():  # our own folder: an earlier run's pages must not linger in this one's site
        import shutil

        shutil.rmtree(docs_dir)
    ctx = gx.get_context(mode="ephemeral")
    try:  # GX's per-metric progress bars flood logs
        ctx.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 -- cosmetic only
        pass
    ctx.add_data_docs_site(site_name="stagewise", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = ctx.data_sources.add_pandas("curated")

    results, counts, failures = {}, {}, []
    for kind in input_kinds(in_dir):
        rows = list(read_jsonl(Path(in_dir) / f"{kind}.jsonl"))
        counts[kind] = len(rows)
        df = frame(kind, rows)
        batch = source.add_dataframe_asset(kind).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{kind}_suite", expectations=expectations(kind, cfg)))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"validate_{kind}", data=batch, suite=suite))
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"checkpoint_{kind}", validation_definitions=[vd],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["stagewise"])],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5,
                           "unexpected_index_column_names": ["id"]}))
        run = checkpoint.run(batch_parameters={"dataframe": df})
        checks = []
        for vr in run.run_results.values():
            for r in vr.results:
                conf = r.expectation_config
                sev = getattr(getattr(conf, "severity", None), "value", None) or conf.meta.get("severity", "critical")
                check = {"expectation": conf.type, "column": conf.kwargs.get("column"), "severity": sev,
                         "success": bool(r.success), "unexpected_count": (r.result or {}).get("unexpected_count"),
                         # the failing records' ids when GX has them, else the failing values
                         "examples": ((r.result or {}).get("partial_unexpected_index_list")
                                      or (r.result or {}).get("partial_unexpected_list") or [])[:5]}
                checks.append(check)
                if not r.success and _fails(sev, cfg.fail_on):
                    failures.append(f"{kind}: {conf.type}({check['column']}) failed on {check['unexpected_count']} "
                                    f"of {len(rows)} rows, e.g. {check['examples'][:3]}")
        results[kind] = {"success": bool(run.success), "checks": checks}

    index = docs_dir / "index.html"
    stats = {"step": "validate", "input": counts, "kept": counts, "removed": {},
             "expectations": {k: {"success": v["success"], "evaluated": len(v["checks"]),
                                  "failed": [c["expectation"] + (f"({c['column']})" if c["column"] else "")
                                             for c in v["checks"] if not c["success"]]} for k, v in results.items()},
             # relative to this folder: the stats are a DVC output, and must not depend on the checkout's location
             "data_docs": index.relative_to(out_dir).as_posix() if index.exists() else None}
    write_json(out_dir / "results.json", results)
    write_json(out_dir / "stats.json", stats)
    if failures:
        raise ValidationFailed("curated data failed critical expectations (Data Docs: "
                               f"{index}):\n  - " + "\n  - ".join(failures))
    return stats


def _fails(severity: str, fail_on: str) -> bool:
    return {"critical": severity == "critical", "warning": severity in ("critical", "warning"), "never": False}[fail_on]


def frame(kind: str, rows: list[dict]):
    """The columns the suites check: raw fields plus derived ones (roles, lengths, equality)."""
    import pandas as pd

    def s(v):  # keep non-strings visible to the type expectations
        return v

    if kind == "corpus":
        data = {"id": [r.get("id") for r in rows], "text": [s(r.get("text")) for r in rows]}
    elif kind == "chat":
        msgs = [r.get("messages") or [] for r in rows]
        data = {"id": [r.get("id") for r in rows],
                "roles": [",".join(str(m.get("role")) for m in ms) for ms in msgs],
                "n_messages": [len(ms) for ms in msgs],
                "min_content_chars": [min((len(m.get("content") or "") for m in language_turns(ms)), default=0)
                                      for ms in msgs],
                "tool_problem": [_tool_problem(r) for r in rows]}
    elif kind == "preference":
        data = {"id": [r.get("id") for r in rows], **{k: [r.get(k) for r in rows] for k in ("prompt", "chosen", "rejected")},
                "chosen_equals_rejected": [str(r.get("chosen", "")).strip() == str(r.get("rejected", "")).strip() for r in rows]}
    elif kind == "rag":
        data = {"id": [r.get("id") for r in rows], "question": [r.get("question") for r in rows],
                "answer": [r.get("answer") for r in rows]}
    else:
        data = {"id": [r.get("id") for r in rows], "prompt": [r.get("prompt") for r in rows],
                "answer": [r.get("answer") for r in rows]}
    return pd.DataFrame(data, dtype=object)


def _tool_problem(rec: dict) -> str:
    """"" for a chat record whose tool use is sound (or that uses none), else the reason code."""
    from stagewise.tools import ToolError, check_chat, has_tools

    if not isinstance(rec.get("messages"), list) or not has_tools(rec):
        return ""
    try:
        check_chat(rec)
    except (ToolError, KeyError, TypeError, AttributeError) as e:
        return getattr(e, "code", "tool_bad_call")
    return ""


def expectations(kind: str, cfg: ValidateConfig) -> list:
    """The suite of one kind; `severity` decides whether a failure stops the flow."""
    import great_expectations.expectations as gxe

    crit, warn = "critical", "warning"
    ids = [gxe.ExpectColumnValuesToNotBeNull(column="id", severity=crit),
           gxe.ExpectColumnValuesToBeUnique(column="id", severity=crit),
           gxe.ExpectColumnValuesToBeOfType(column="id", type_="str", severity=crit)]
    if kind == "corpus":
        return ids + [
            gxe.ExpectColumnValuesToNotBeNull(column="text", severity=crit),
            gxe.ExpectColumnValuesToBeOfType(column="text", type_="str", severity=crit),
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_text_chars, severity=crit),
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", max_value=cfg.max_text_chars, severity=warn),
        ]
    if kind == "chat":
        # optional system turn, then user/assistant pairs (tool turns after an assistant turn)
        order = r"^(?:system,)?user,assistant(?:,tool)*(?:,tool,assistant)*(?:,user,assistant(?:,tool)*(?:,tool,assistant)*)*$"
        return ids + [
            gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=order, severity=crit),
            gxe.ExpectColumnValuesToBeBetween(column="n_messages", min_value=2, severity=crit),
            gxe.ExpectColumnValuesToBeBetween(column="min_content_chars", min_value=cfg.min_text_chars, severity=crit),
            # every call names a declared tool, arguments parse and match its schema, results answer a call
            gxe.ExpectColumnValuesToBeInSet(column="tool_problem", value_set=[""], severity=crit),
        ]
    if kind == "preference":
        return ids + [e for col in ("prompt", "chosen", "rejected") for e in (
            gxe.ExpectColumnValuesToNotBeNull(column=col, severity=crit),
            gxe.ExpectColumnValueLengthsToBeBetween(column=col, min_value=cfg.min_text_chars, severity=crit),
        )] + [gxe.ExpectColumnValuesToBeInSet(column="chosen_equals_rejected", value_set=[False], severity=crit)]
    if kind == "rag":
        return ids + [e for col in ("question", "answer") for e in (
            gxe.ExpectColumnValuesToNotBeNull(column=col, severity=crit),
            gxe.ExpectColumnValueLengthsToBeBetween(column=col, min_value=cfg.min_text_chars, severity=crit),
        )]
    return ids + [
        gxe.ExpectColumnValuesToNotBeNull(column="prompt", severity=crit),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=cfg.min_text_chars, severity=crit),
        gxe.ExpectColumnValuesToNotBeNull(column="answer", severity=crit),
        gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=rf"^\s*(?:{cfg.answer_regex})\s*$", severity=crit),
    ]


@task(name="validate", retries=1)
def validate_task(cfg: ValidateConfig, in_dir: Path, out_dir: Path) -> dict:
    """Check the curated data with Great Expectations; build Data Docs."""
    return validate(cfg, in_dir, out_dir)
