"""tokenizer: byte-level BPE / char vocabularies, the chat template's assistant mask, bad input."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from stage_fixtures import curated, smoke_cfg, tokenizer_dir
from tasks.tokenizer import train_tokenizer


def test_bpe_roundtrip_and_compression():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    text = "In the morning, Ana walked to the old bridge near the river. The fox eats berries."
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2            # merges learned: over two characters per token
    assert len(tok) == smoke_cfg().tokenizer.vocab_size
    assert tok.decode(tok("zebra ünïcödé ✓").input_ids) == "zebra ünïcödé ✓"   # byte-level: no unknowns


def test_chat_template_masks_only_assistant_turn_including_end_token():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    msgs = [{"role": "user", "content": "What color is the fox?"}, {"role": "assistant", "content": "The fox is red."}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "The fox is red.<|end|>"
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>What color is the fox?<|end|><|assistant|>"


def test_char_tokenizer(tmp_path):
    res = train_tokenizer(smoke_cfg("tokenizer.kind=char").tokenizer, curated(), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert res["vocab_size"] == 256 + 6
    assert len(tok("The fox eats fish.").input_ids) == len("The fox eats fish.")
    assert res["chars_per_token"] == pytest.approx(1.0, abs=0.02)


def test_bad_input_names_file_and_line(tmp_path):
    cur = tmp_path / "cur"
    cur.mkdir()
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        train_tokenizer(smoke_cfg().tokenizer, cur, tmp_path / "tok")
    (cur / "corpus.jsonl").write_text(json.dumps({"id": "a", "text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not valid JSON"):
        train_tokenizer(smoke_cfg().tokenizer, cur, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
