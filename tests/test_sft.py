"""sft: assistant-only fine-tuning moves instruction following; QLoRA runs end to end and is merged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from stage_fixtures import curated, plain_sft_model, pretrained, sft_model, smoke_cfg
from stagewise.modeling import load_chats
from tasks.sft import sft, with_replay


def test_sft_teaches_the_answer_format():
    out, res = sft_model()
    b, a = res["before"], res["after"]
    assert a["instruct_format"] >= b["instruct_format"] + 0.5        # the pretrained model never answers in form
    assert res["train_metrics"]["final_loss"] < res["train_metrics"]["first_loss"]
    assert (out / "model.safetensors").exists() and not (out / "adapter").exists()
    assert json.loads((out / "stage_info.json").read_text())["stage"] == "sft"


def test_replay_rows_train_on_every_token_chats_on_the_assistant_only():
    from stagewise.modeling import load_tokenizer

    tok = load_tokenizer(pretrained()[0])
    chats, _ = load_chats(curated())
    rows, n = with_replay(tok, chats[:10], curated(), 0.5, seed=0)
    assert n == 5 and len(rows) == 15
    full = [r for r in rows if all(r["assistant_masks"])]
    chat = [r for r in rows if not all(r["assistant_masks"])]
    assert len(full) == 5 and len(chat) == 10
    for r in chat:   # the user turn is masked, the assistant's answer is not
        assert 0 < sum(r["assistant_masks"]) < len(r["input_ids"])
        assert r["assistant_masks"][0] == 0
    assert with_replay(tok, chats[:10], curated(), 0.0, seed=0) == (chats[:10], 0)
    # a ratio too small for one document leaves the conversations as they are (TRL tokenizes them)
    assert with_replay(tok, chats[:1], curated(), 0.25, seed=0) == (chats[:1], 0)


def test_replay_counters_the_forgetting_of_general_text(tmp_path):
    """Plain chat SFT raises held-out general-text NLL; replaying corpus documents holds it down."""
    _, replay = sft_model()    # the default: sft.replay_ratio 1.0
    _, plain = plain_sft_model()
    assert replay["n_replay"] == replay["n_train"] and plain["n_replay"] == 0
    before = plain["before"]["general_text_nll"]
    assert plain["after"]["general_text_nll"] > before + 0.1          # forgetting happens without replay
    assert replay["after"]["general_text_nll"] < plain["after"]["general_text_nll"] - 0.1
    assert replay["after"]["instruct_format"] >= replay["before"]["instruct_format"] + 0.5   # SFT still works


def test_rows_without_assistant_turn_are_counted(tmp_path):
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"}]}) + "\n"
        + json.dumps({"id": "b", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n")
    rows, skipped = load_chats(tmp_path)
    assert len(rows) == 1 and skipped == {"no_assistant_turn": 1}


def test_qlora_end_to_end_merges_adapter(tmp_path):
    parent, _ = pretrained()
    cfg = smoke_cfg("sft.peft=qlora", "sft.lora.r=8", "sft.lora.alpha=16", "sft.eval_limit=30")
    res = sft(cfg, parent, curated(), tmp_path / "sft")
    assert res["peft"] == "qlora"
    assert res["after"]["instruct_format"] >= res["before"]["instruct_format"] + 0.3
    out = tmp_path / "sft"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged, base = load_file(out / "model.safetensors"), load_file(parent / "model.safetensors")
    assert all(not k.startswith("base_model") and "lora" not in k for k in merged)   # a plain full model
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.float32 and not torch.equal(merged[q], base[q])


@pytest.mark.slow
def test_sft_under_accelerate_two_processes(tmp_path):
    """train.launcher=accelerate: `accelerate launch` with 2 CPU ranks (gloo) — each step sees 2 batches."""
    parent, _ = pretrained()
    single = sft_model()[1]
    cfg = smoke_cfg("train.launcher=accelerate")
    res = sft(cfg, parent, curated(), tmp_path / "sft")
    rows, epochs, bs = res["n_train"] + res["n_replay"], int(cfg.sft.epochs), cfg.sft.batch_size
    assert single["steps"] == epochs * math.ceil(rows / bs)
    assert res["steps"] == epochs * math.ceil(rows / (2 * bs))       # half the steps: 2 ranks
    assert res["after"]["instruct_format"] >= res["before"]["instruct_format"] + 0.3
    assert (tmp_path / "sft" / "model.safetensors").exists()
