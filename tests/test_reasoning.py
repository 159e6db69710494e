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


def test_grpo_raises_the_verifiable_reward_and_sft_vs_rft_table(tmp_path):
    parent, _ = dpo_model()
    cfg = smoke_cfg()
    res = reasoning(cfg, parent, curated(), tmp_path / "reasoning")
    assert res["steps"] == cfg.reasoning.max_steps
    assert 0.0 <= res["frac_zero_variance_groups"] < 1.0          # some groups carried a learning signal
    assert res["train_reward_last"] > res["train_reward_first"] + 0.1  # GRPO climbed its own reward
    for key in ("arithmetic_greedy_pass1", "arithmetic_pass1", "arithmetic_pass4", "arithmetic_unseen_pass1"):
        assert key in res["before"] and key in res["after"]
    assert (tmp_path / "reasoning" / "model.safetensors").exists()

    table = sft_vs_rft(cfg, parent, curated(), tmp_path / "reasoning", tmp_path / "svr")
    assert [r["method"] for r in table] == ["parent", "sft_on_solutions", "rft_grpo"]
    assert all("arithmetic_pass1" in r and "arithmetic_unseen_pass1" in r for r in table)
    parent_row, rft_row = table[0], table[2]
    # the table evaluates the models it names: same numbers as the stage's own before/after check
    assert parent_row["arithmetic_greedy_pass1"] == round(res["before"]["arithmetic_greedy_pass1"], 3)
    assert rft_row["arithmetic_greedy_pass1"] == round(res["after"]["arithmetic_greedy_pass1"], 3)
    assert table[1]["train_wall_s"] > 0
