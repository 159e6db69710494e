"""Great Expectations validation: suites per kind pass on good data, stop the flow on critical failures."""

import pytest

from stagewise.config import ValidateConfig
from stagewise.records import write_jsonl
from tasks.validate import ValidationFailed, validate


def good_data(d):
    write_jsonl(d / "corpus.jsonl", [{"id": "c1", "text": "A document."}, {"id": "c2", "text": "Another one."}])
    write_jsonl(d / "chat.jsonl", [{"id": "m1", "messages": [{"role": "user", "content": "Hi?"},
                                                             {"role": "assistant", "content": "Hello."}]}])
    write_jsonl(d / "preference.jsonl", [{"id": "p1", "prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    write_jsonl(d / "verifiable.jsonl", [{"id": "v1", "prompt": "2+2?", "answer": "4"}])


def test_suites_pass_on_good_data_fail_with_readable_message_on_bad(tmp_path):
    good_data(tmp_path / "good")
    stats = validate(ValidateConfig(), tmp_path / "good", tmp_path / "out")
    assert all(e["success"] and e["evaluated"] >= 5 for e in stats["expectations"].values())
    assert set(stats["expectations"]) == {"corpus", "chat", "preference", "verifiable"}
    assert stats["data_docs"] == "data_docs/index.html"              # relative: stats.json is a DVC output
    assert "verifiable_suite" in (tmp_path / "out" / stats["data_docs"]).read_text()

    bad = tmp_path / "bad"
    good_data(bad)
    write_jsonl(bad / "chat.jsonl", [{"id": "m1", "messages": [{"role": "assistant", "content": "Hello."},
                                                               {"role": "user", "content": "Hi?"}]}])
    write_jsonl(bad / "preference.jsonl", [{"id": "p1", "prompt": "Q?", "chosen": "A.", "rejected": "A."},
                                           {"id": "p1", "prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    write_jsonl(bad / "verifiable.jsonl", [{"id": "v1", "prompt": "2+2?", "answer": "four"}])
    with pytest.raises(ValidationFailed) as err:
        validate(ValidateConfig(), bad, tmp_path / "out_bad")
    msg = str(err.value)
    for expected in ("chat: expect_column_values_to_match_regex(roles)", "preference: expect_column_values_to_be_unique(id)",
                     "chosen_equals_rejected", "verifiable: expect_column_values_to_match_regex(answer)", "'v1'"):
        assert expected in msg
    assert "corpus" not in msg                                      # the good kind is not blamed
    assert (tmp_path / "out_bad" / "data_docs" / "index.html").exists()   # docs are built before raising
    # fail_on=never reports without stopping
    stats = validate(ValidateConfig(fail_on="never"), bad, tmp_path / "out_never")
    assert not stats["expectations"]["verifiable"]["success"]
