"""The acceptance test of curation: on the demo world, every planted defect is removed for the right
reason (and duplicates point to their original, leaks to their benchmark item), and no clean record
is removed."""

import json
from pathlib import Path

import pytest

from stagewise.config import load_config
from tasks.decontaminate import decontaminate
from tasks.dedup import dedup
from tasks.generate import generate
from tasks.ingest import ingest
from tasks.quality import quality

REPO = Path(__file__).resolve().parents[1]

# planted junk category (tasks/generate.py) -> the reason code that must remove it
JUNK_REASON = {
    "short": "gopher_short_doc", "symbols": "gopher_too_many_hashes", "no_alpha": "gopher_below_alpha_threshold",
    "no_stopwords": "gopher_enough_stop_words", "repetition": "gopher_rep_dup_line_frac", "boilerplate": "c4_lorem_ipsum",
    "empty_response": "chat_empty_response", "role_order": "chat_role_order", "no_response": "chat_no_response",
    "chosen_equals_rejected": "pref_chosen_equals_rejected", "answer_not_numeric": "verifiable_answer_unparseable",
}


def removed_rows(step_dir: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for f in (step_dir / "removed").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[(r["kind"], r["id"])] = r
    return out


@pytest.mark.parametrize("profile,sets", [("smoke", ()), (None, ()), ("smoke", ("generate.n_tool_chat=150",))],
                         ids=["smoke", "default", "smoke-tools"])
def test_every_planted_defect_goes_for_its_reason_and_nothing_clean_goes(tmp_path, profile, sets):
    cfg = load_config(REPO / "params.yaml", profile=profile, overrides=list(sets))
    raw = tmp_path / "01_raw"
    generate(cfg.generate, raw)
    ingest(cfg.data, cfg.ingest, raw, tmp_path / "02")
    quality(cfg.quality, tmp_path / "02", tmp_path / "03")
    dedup(cfg.dedup, tmp_path / "03", tmp_path / "04")
    final = decontaminate(cfg.decontaminate, tmp_path / "04", raw / "benchmarks", tmp_path / "05")

    manifest = json.loads((raw / "manifest.json").read_text())
    removed = {step: removed_rows(tmp_path / step) for step in ("03", "04", "05")}
    expected = {}   # (kind, id) -> (step dir, reason, detail key, detail value)
    for kind, m in manifest.items():
        for rid, category in m["junk"].items():
            expected[(kind, rid)] = ("03", JUNK_REASON[category], None, None)
        for reason in ("exact_dup", "near_dup"):
            for rid, original in m[reason].items():
                expected[(kind, rid)] = ("04", reason, "duplicate_of", original)
        for rid, ref in m["leak"].items():
            expected[(kind, rid)] = ("05", "contaminated", "matched", ref)
    assert len(expected) == sum(len(v) for m in manifest.values() for v in m.values())
    assert sum(len(manifest["corpus"][c]) for c in ("junk", "exact_dup", "near_dup", "leak")) == (
        cfg.generate.n_junk + cfg.generate.n_exact_dup + cfg.generate.n_near_dup + cfg.generate.n_leaks)

    for key, (step, reason, detail, value) in expected.items():
        row = removed[step].get(key)
        assert row is not None, f"planted {key} not removed by step {step} ({reason})"
        assert row["reason"] == reason, (key, row["reason"], reason)
        if detail:
            assert row[detail] == value, (key, detail, row[detail], value)
    everything_removed = {k for rows in removed.values() for k in rows}
    assert everything_removed == set(expected), f"clean records removed: {sorted(everything_removed - set(expected))}"

    # and the funnel adds up: input = kept + removed, per kind, at the end
    generated = {k: sum(1 for _ in (raw / f"{k}.jsonl").open()) for k in manifest}
    for kind in manifest:
        n_removed = sum(1 for (k, _) in everything_removed if k == kind)
        assert final["kept"][kind] == generated[kind] - n_removed
