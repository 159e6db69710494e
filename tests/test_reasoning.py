"""reasoning: verifiable rewards, bad answers rejected by name, GRPO end to end, the SFT-vs-RFT table."""

from __future__ import annotations

import json

import pytest

from stage_fixtures import curated, dpo_model, smoke_cfg
from tasks.reasoning import correctness_reward, format_reward, load_problems, reasoning, sft_vs_rft


def test_rewards():
    comps = [[{"role": "assistant", "content": c}] for c in
             ["The answer is 7.", "I think it is 7", "The answer is 8.", "7 or maybe 9", "The answer is 7. Or 9."]]
    assert correctness_reward(comps, answer=["7"] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert format_reward(comps) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_non_integer_answer_is_named(tmp_path):
    (tmp_path / "verifiable.jsonl").write_text(
        json.dumps({"id": "a", "prompt": "1+1?", "answer": "2"}) + "\n"
        + json.dumps({"id": "b", "prompt": "how many?", "answer": "many"}) + "\n")
    with pytest.raises(ValueError, match=r"verifiable.jsonl:2: answer 'many' is not an integer"):
        load_problems(tmp_path)
