"""sft: assistant-only fine-tuning moves instruction following; QLoRA runs end to end and is merged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from stage_fixtures import curated, pretrained, sft_model, smoke_cfg
from tasks.sft import load_chats, sft


def test_sft_teaches_the_answer_format():
    out, res = sft_model()
    b, a = res["before"], res["after"]
    assert a["instruct_format"] >= b["instruct_format"] + 0.5        # the pretrained model never answers in form
    assert res["train_metrics"]["final_loss"] < res["train_metrics"]["first_loss"]
    assert (out / "model.safetensors").exists() and not (out / "adapter").exists()
    assert json.loads((out / "stage_info.json").read_text())["stage"] == "sft"


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
    res = sft(smoke_cfg("train.launcher=accelerate"), parent, curated(), tmp_path / "sft")
    assert res["steps"] == single["steps"] // 2
    assert res["after"]["instruct_format"] >= res["before"]["instruct_format"] + 0.3
    assert (tmp_path / "sft" / "model.safetensors").exists()
