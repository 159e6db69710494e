"""modeling: dense and MoE builds, atomic save, bf16 switch, answer parsing."""

from __future__ import annotations

import pytest
import torch

from stage_fixtures import smoke_cfg, tokenizer_dir
from stagewise.modeling import (
    build_model, load_model, load_tokenizer, param_counts, parse_answer, publish_dir, save_model, use_bf16,
)


def test_moe_has_fewer_active_than_total_params():
    cfg = smoke_cfg("model.architecture=moe", "model.num_experts=4", "model.experts_per_token=1")
    tok = load_tokenizer(tokenizer_dir())
    moe = build_model(cfg.model, tok)
    dense = build_model(smoke_cfg().model, tok)
    c = param_counts(moe)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert c["params"] > param_counts(dense)["params"]
    # 3 of 4 experts idle per token
    expert = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    assert c["params"] - c["params_active"] == expert * 3 // 4


def test_save_is_complete_and_atomic(tmp_path):
    tok = load_tokenizer(tokenizer_dir())
    model = build_model(smoke_cfg().model, tok)
    out = tmp_path / "m"
    save_model(model, tok, out, info={"stage": "x"})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "stage_info.json"} <= names
    assert "{% generation %}" in load_tokenizer(out).chat_template
    again = load_model(out)
    assert again.dtype == torch.float32
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)

    def crash(d):
        (d / "half-written").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        publish_dir(out, crash)
    assert {p.name for p in out.iterdir()} == names          # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m"]      # and no temp folder is left behind


def test_bf16_switch():
    assert use_bf16(smoke_cfg("train.bf16=false").train) is False
    assert use_bf16(smoke_cfg("train.bf16=true").train) is True
    assert isinstance(use_bf16(smoke_cfg("train.bf16=auto").train), bool)


@pytest.mark.parametrize("text,want", [
    ("The answer is 12.", "12"), ("the answer is -3", "-3"), ("I think 4 then 9", "9"), ("no idea", None),
    ("The answer is 7. Or 8.", "7"),
])
def test_parse_answer(text, want):
    assert parse_answer(text) == want
