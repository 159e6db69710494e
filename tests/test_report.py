"""The gate report: verdict first, every rule with its numbers, plots embedded, leaks listed."""

from __future__ import annotations

import base64
import re

import pytest

from stagewise.config import GateConfig
from stagewise.report import headline, write_gate_report
from tasks.gate import gate
from test_gate import BASE_LL, model_results, ones

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_summary(passed_gate: bool) -> dict:
    parent = model_results(ones(10), ones(48), BASE_LL)
    cand = model_results(ones(45), ones(48 if passed_gate else 24), BASE_LL)
    g = gate("sft", cand, parent, None, GateConfig(), bootstrap_iters=200).to_dict()
    return {
        "run_id": "20261123-180000-abc123", "profile": "smoke", "started": "2026-11-23T18:00:00+00:00",
        "stages": [
            {"name": "pretrain", "model_version": "1", "parent_version": None,
             "target_metric": "sw_general_text.word_perplexity", "value": 35.2, "baseline_value": 1830.0,
             "higher_is_better": False, "improved": True, "cached": False, "seconds": 61.0,
             "general": {"sw_general_mc.acc": {"value": 0.8, "baseline": 0.25, "higher_is_better": True}}},
            {"name": "sft", "model_version": "2", "parent_version": "1", "target_metric": "sw_instruct.token_f1",
             "value": 0.75, "baseline_value": 0.1667, "higher_is_better": True, "improved": True, "cached": True,
             "seconds": 1.0,
             "general": {"sw_general_mc.acc": {"value": 0.8 if passed_gate else 0.4, "baseline": 0.8,
                                               "higher_is_better": True}}},
        ],
        "gate": g,
        "champion": {"name": "stagewise", "version": "2" if passed_gate else "1"},
        "challenger": {"name": "stagewise", "version": "2"},
        "curation": {
            "funnel": [{"step": "quality", "kind": "corpus", "input": 1300, "kept": 1260},
                       {"step": "dedup", "kind": "corpus", "input": 1260, "kept": 1200},
                       {"step": "decontaminate", "kind": "corpus", "input": 1200, "kept": 1190},
                       {"step": "quality", "kind": "chat", "input": 640, "kept": 628}],
            "removed": {"gopher_short_doc": 7, "exact_dup": 30, "contaminated": 10},
            "contaminated": [{"id": "c-00042", "kind": "corpus", "benchmark_item": "general_text:gt-0003"},
                             {"id": "chat-00007", "kind": "chat", "benchmark_item": "instruct:ins-0001"}],
        },
        "compression": {"candidates": [{"method": "none", "size_mb": 13.9, "value": 0.75},
                                       {"method": "int8", "size_mb": 4.3, "value": 0.74},
                                       {"method": "nf4", "size_mb": 2.7, "value": 0.70},
                                       {"method": "prune50", "size_mb": 7.0, "value": 0.60}],
                        "chosen": {"method": "int8", "size_mb": 4.3, "value": 0.74}},
    }


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_failed_gate_report_says_not_promoted_first_and_names_the_culprit(tmp_path):
    md, page = write_gate_report(tmp_path / "r", make_summary(passed_gate=False))
    text = md.read_text()
    first = [line for line in text.splitlines() if line.strip()][1]
    assert first.startswith("**NOT PROMOTED") and "champion remains stagewise v1" in first
    assert "sw_general_mc.acc" in text.split("## Gate rules")[0]        # the why, before any table
    row = next(line for line in text.splitlines() if line.startswith("| FAIL"))
    assert "general_no_drop" in row and "-40.00 pts" in row            # the rule with its numbers
    html_text = page.read_text()
    assert "fail-bg" in html_text and "NOT PROMOTED" in html_text.split("<h2>")[0]


def test_passed_gate_report_embeds_every_plot_and_lists_leaks(tmp_path):
    summary = make_summary(passed_gate=True)
    md, page = write_gate_report(tmp_path, summary)
    assert md.name == "gate.md" and page.name == "gate.html"
    passed, verdict, _ = headline(summary)
    assert passed and verdict == "PROMOTED: stagewise v2 is the champion"
    html_text = page.read_text()
    assert "src=\"http" not in html_text and "<script" not in html_text   # self-contained, nothing fetched
    pngs = images(html_text)
    assert len(pngs) == 4  # rules, lineage, funnel, Pareto
    assert all(p.startswith(PNG_MAGIC) and len(p) > 5000 for p in pngs)
    section = html_text.split("Contamination found in training data")[1]
    assert "c-00042" in section and "general_text:gt-0003" in section and "instruct:ins-0001" in section
    assert "c-00042" in md.read_text().split("## Contamination found in training data")[1]
    assert "Chosen: int8" in md.read_text()


def test_optional_sections_are_left_out_cleanly(tmp_path):
    summary = make_summary(passed_gate=True)
    del summary["compression"]
    summary["curation"]["contaminated"] = []
    del summary["curation"]["removed"]["contaminated"]
    _, page = write_gate_report(tmp_path, summary)
    html_text = page.read_text()
    assert len(images(html_text)) == 3 and "Compression" not in html_text
    assert "None found." in html_text.split("Contamination found in training data")[1]


@pytest.mark.parametrize("summary", [{}, {"run_id": "x", "gate": {"passed": False}}])
def test_minimal_summaries_still_render_a_verdict(tmp_path, summary):
    md, page = write_gate_report(tmp_path, summary)
    assert "NOT PROMOTED" in md.read_text() and "NOT PROMOTED" in page.read_text()


def test_compress_step_result_is_reported_with_its_own_pareto_plot(tmp_path):
    """The shape tasks/compress.py returns: parent_measure, candidates with metrics/check, chosen by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    plot = tmp_path / "pareto.png"
    fig.savefig(plot)
    plt.close(fig)
    def row(method, mem, ppl, ok=True):
        return {"method": method, "params": 100_000, "bytes": mem * 2, "memory_bytes": mem, "tokens_per_s": 50.0,
                "metrics": {"sw_general_text.word_perplexity": ppl},
                "check": {"passed": ok, "failed": [], "task_metric": "sw_general_text.word_perplexity"}}
    summary = make_summary(passed_gate=True)
    summary["compression"] = {
        "parent_measure": row("parent", 14_000_000, 30.0),
        "candidates": [row("quantize_int8", 4_300_000, 30.4), row("prune_50", 7_000_000, 45.0, ok=False),
                       {"method": "merge_ties", "model_dir": None, "error": "skipped: no second model"}],
        "chosen": "quantize_int8", "reason": "quantize_int8: smallest passing candidate", "plot": str(plot),
        "machine": {"cpu": "AMD EPYC 9B14", "flags": {"avx512f": True, "avx512_bf16": True}, "threads": 2,
                    "gpu": None}}
    md, page = write_gate_report(tmp_path / "r", summary)
    text = md.read_text()
    section = text.split("## Compression candidates")[1]
    assert "Tokens/s measured on AMD EPYC 9B14 (avx512f, avx512_bf16), 2 thread(s), no GPU." in section
    assert "| quantize_int8 (chosen) | 4.3 | 30.4 |" in section and "| prune_50 | 7 | 45 | 50 | 1.00x | – | no |" in section
    assert "skipped: no second model" in section and "Chosen: quantize_int8 — quantize_int8: smallest" in section
    assert images(page.read_text())[-1] == plot.read_bytes()       # the compress step's own plot, embedded
    plot.unlink()                                                  # gone: we draw one from the numbers
    _, page = write_gate_report(tmp_path / "r2", summary)
    assert images(page.read_text())[-1].startswith(PNG_MAGIC) and len(images(page.read_text())) == 4


def test_gate_not_run_says_so_instead_of_failed(tmp_path):
    summary = make_summary(passed_gate=True)
    summary["gate"] = {"passed": None, "reasons": ["gate not run"]}
    md, page = write_gate_report(tmp_path, summary)
    assert "**NOT GATED: nothing promoted; champion remains stagewise v2**" in md.read_text()
    assert "none-bg" in page.read_text() and "PROMOTED:" not in page.read_text().replace("NOT GATED", "")


def test_contamination_count_without_item_list_is_not_reported_as_none(tmp_path):
    summary = make_summary(passed_gate=True)
    summary["curation"]["contaminated"] = []          # counts known, items not passed along
    md, _ = write_gate_report(tmp_path, summary)
    section = md.read_text().split("## Contamination found in training data")[1]
    assert "None found" not in section and "10 training record(s) were removed as contaminated" in section


def test_report_names_whom_the_candidate_was_compared_with(tmp_path):
    from stagewise.report import write_gate_report

    s = make_summary(passed_gate=False)
    s["gate"].update(candidate={"stage": "reasoning", "version": "4"},
                     compared_with={"parent": "3", "base": "1", "champion": None})
    md, page = write_gate_report(tmp_path, s)
    assert "candidate reasoning v4 compared with: parent v3, base v1 (base: where fine-tuning started)" in md.read_text()
    s["gate"]["compared_with"] = {"parent": "1", "base": None, "champion": "2"}
    md, _ = write_gate_report(tmp_path, s)
    assert "compared with: parent v1, champion v2\n" in md.read_text()


def test_metrics_scored_beside_the_rules_are_shown_not_enforced(tmp_path):
    """A sampled target passing while greedy accuracy or the chat skill falls must be visible."""
    s = make_summary(passed_gate=True)
    s["gate"]["comparisons"] = [
        {"rule": "compare", "metric": "sw_arithmetic.exact_match", "against": "parent", "unit": "points",
         "enforced": False, "candidate": 0.30, "baseline": 0.19, "delta": 11.0, "ci_low": 0.0, "ci_high": 21.0},
        {"rule": "compare", "metric": "sw_instruct.token_f1", "against": "base", "unit": "points",
         "enforced": False, "candidate": 0.41, "baseline": 0.93, "delta": -52.0, "ci_low": -60.0, "ci_high": -44.0}]
    md, page = write_gate_report(tmp_path, s)
    text = md.read_text()
    assert "Also measured (not gate rules):" in text
    assert "| sw_instruct.token_f1 | base | 0.93 | 0.41 | -52" in text.replace("−", "-")
    assert text.index("Also measured") < text.index("## Stages")
    assert "sw_arithmetic.exact_match" in page.read_text() and "Also measured" in page.read_text()
    assert headline(s)[0] is True      # shown, and the verdict is still the rules'


def test_gate_report_shows_uncompressed_and_shipped_side_by_side(tmp_path):
    def row(method, mem, tps, acc):
        return {"method": method, "params": mem // 4, "bytes": mem, "memory_bytes": mem, "tokens_per_s": tps,
                "tokens_per_s_batched": tps * 3, "metrics": {"sw_arithmetic_sampled/pass1": acc}}
    summary = make_summary(passed_gate=True)
    summary["compression"] = {"parent": row("parent", 3_660_000, 987.0, 0.2375), "parent_version": "4",
                              "candidates": [row("distill", 1_500_000, 1530.0, 0.2475)], "chosen": "distill",
                              "model_version": "6", "reason": "distill won"}
    md, page = write_gate_report(tmp_path / "r", summary)
    section = md.read_text().split("## Uncompressed vs shipped")[1].split("##")[0]
    assert "| measure | uncompressed (v4) | shipped: distill (v6) | shipped / uncompressed |" in section
    assert "| memory (MB) | 3.66 | 1.5 | 0.41x |" in section
    assert "| tokens/s, batch 1 | 987 | 1530 | 1.55x |" in section
    assert "| sw_arithmetic_sampled/pass1 | 0.2375 | 0.2475 | +0.01 |" in section
    assert "Uncompressed vs shipped" in page.read_text()
