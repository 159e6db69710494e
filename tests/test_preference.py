"""preference: DPO widens the held-out chosen-vs-rejected margin; RLHF (reward model + PPO) runs end to end."""

from __future__ import annotations

import json

from stage_fixtures import curated, dpo_model, sft_model, smoke_cfg
from tasks.preference import preference


def test_dpo_widens_heldout_margin_over_sft():
    out, res = dpo_model()
    assert res["method"] == "dpo"
    assert res["after"]["margin"] > res["before"]["margin"]          # held-out log p(chosen) − log p(rejected)
    assert res["after"]["implicit_reward_margin"] > 0
    assert res["after"]["accuracy"] >= res["before"]["accuracy"]
    assert res["train_metrics"]["final_loss"] < 0.6931                # below the untrained DPO loss ln 2
    assert (out / "model.safetensors").exists()


def test_rlhf_reward_model_and_ppo_end_to_end(tmp_path):
    res = preference(smoke_cfg("preference.method=rlhf"), sft_model()[0], curated(), tmp_path / "pref")
    assert res["method"] == "rlhf"
    assert res["reward_model_pairwise_accuracy"] > 0.5               # held-out pairs, better than chance
    assert res["after"]["reward_mean"] > res["before"]["reward_mean"]  # PPO raised the judged reward...
    assert res["win_rate_vs_parent"] > 0.5                           # ...and beats the SFT replies head to head
    kls = [h["kl"] for h in [res["train_metrics"]["ppo_first"], res["train_metrics"]["ppo_last"]]]
    assert kls[-1] > 0                                                # the policy moved away from the reference
    out = tmp_path / "pref"
    assert (out / "reward_model" / "model.safetensors").exists() and (out / "value_head.safetensors").exists()
    assert json.loads((out / "stage_info.json").read_text())["method"] == "rlhf"
