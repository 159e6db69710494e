"""reasoning: verifiable rewards, bad answers rejected by name, GRPO end to end, the SFT-vs-RFT table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from stage_fixtures import curated, dpo_model, smoke_cfg
from stagewise.modeling import heldout_texts, load_parent, mean_nll
from tasks.reasoning import correctness_reward, format_reward, load_problems, reasoning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sft_vs_rft import sft_vs_rft  # noqa: E402  (an experiment over two steps: bench/)


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


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    """The smoke profile's GRPO (with the corpus replay term) from the DPO model."""
    out = tmp_path_factory.mktemp("grpo") / "reasoning"
    return out, reasoning(smoke_cfg(), dpo_model()[0], curated(), out)


def test_grpo_raises_the_verifiable_reward_and_sft_vs_rft_table(grpo, tmp_path):
    parent, _ = dpo_model()
    cfg = smoke_cfg()
    out, res = grpo
    assert res["steps"] == cfg.reasoning.max_steps
    assert 0.0 <= res["frac_zero_variance_groups"] < 1.0          # some groups carried a learning signal
    assert res["train_reward_last"] > res["train_reward_first"] + 0.1  # GRPO climbed its own reward
    for key in ("arithmetic_greedy_pass1", "arithmetic_pass1", "arithmetic_pass4", "arithmetic_unseen_pass1"):
        assert key in res["before"] and key in res["after"]
    assert (out / "model.safetensors").exists()

    table = sft_vs_rft(cfg, parent, curated(), out, tmp_path / "svr")
    assert [r["method"] for r in table] == ["parent", "sft_on_solutions", "rft_grpo"]
    assert all("arithmetic_pass1" in r and "arithmetic_unseen_pass1" in r for r in table)
    parent_row, rft_row = table[0], table[2]
    # the table evaluates the models it names: same numbers as the stage's own before/after check
    assert parent_row["arithmetic_greedy_pass1"] == round(res["before"]["arithmetic_greedy_pass1"], 3)
    assert rft_row["arithmetic_greedy_pass1"] == round(res["after"]["arithmetic_greedy_pass1"], 3)
    assert table[1]["train_wall_s"] > 0


def test_replay_term_keeps_the_general_text_plain_grpo_gives_up(grpo, tmp_path):
    """reasoning.replay_coef (PPO-ptx): the same GRPO run without the corpus term loses more general text."""
    out, res = grpo
    cfg = smoke_cfg("reasoning.replay_coef=0")
    plain = reasoning(cfg, dpo_model()[0], curated(), tmp_path / "plain")
    assert "replay_loss_last" not in plain and res["replay_loss_last"] > 0
    texts = heldout_texts(curated(), 30)

    def nll(d):
        return mean_nll(*load_parent(cfg, d), texts)

    before, with_replay, without = nll(dpo_model()[0]), nll(out), nll(tmp_path / "plain")
    assert with_replay < without - 0.1, (before, with_replay, without)
    assert with_replay < before + 0.1      # replay holds general text where the parent had it


def test_replay_needs_the_parents_chats_and_names_the_file(tmp_path):
    (tmp_path / "verifiable.jsonl").write_text(json.dumps({"id": "a", "prompt": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"chat.jsonl"):
        reasoning(smoke_cfg(), dpo_model()[0], tmp_path, tmp_path / "out")


def test_too_few_rows_for_a_replay_batch_is_named(tmp_path):
    (tmp_path / "verifiable.jsonl").write_text(json.dumps({"id": "a", "prompt": "1+1?", "answer": "2"}) + "\n")
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"id": "c", "messages": chat}) + "\n")
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"id": "d", "text": "word " * 400}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl and .*corpus.jsonl: 2 rows to replay, fewer than "
                                         r"reasoning.replay_batch_size=8"):
        reasoning(smoke_cfg(), dpo_model()[0], tmp_path, tmp_path / "out")
