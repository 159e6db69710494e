"""Tool-use conversations in a model's own template: the plain rendering for templates without tool
support (the demo's, SmolLM2's ChatML), the model's own for templates that render `tools` (Qwen2.5's);
the assistant mask checked against the rendered text's character offsets; no token added."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from stagewise.tools import native_messages, plain_messages
from tests.tool_fixtures import TOOLS, multi_call_chat

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.lru_cache(maxsize=None)
def _bpe(specials: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = json.dumps(multi_call_chat(0)) + " the fox eats fish and the answer is 3"
    bpe.train_from_iterator([text] * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return bpe.to_str()


def tokenizer(kind: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from stagewise.modeling import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS

    if kind == "demo":
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe(tuple(SPECIAL_TOKENS))),
                                      bos_token=BOS, eos_token=EOS, pad_token=PAD)
        tok.chat_template = CHAT_TEMPLATE
        return tok
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe(("<|im_start|>", "<|im_end|>", "<|endoftext|>"))),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if kind == "chatml":
        tok.chat_template = SMOLLM2
    else:   # a template that renders tools itself: Qwen2.5's, as TRL ships it
        import trl

        tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    return tok


def masked_spans(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Character spans of each assistant piece (text, calls, end-of-turn), found in order."""
    spans, pos = [], 0
    for p in pieces:
        start = text.index(p, pos)
        spans.append((start, start + len(p)))
        pos = start + len(p)
    return spans


def check_mask(tok, conv: dict, text: str, pieces: list[str]) -> list[int]:
    from stagewise.chat import encode_chat

    n_vocab = len(tok)
    spans = masked_spans(text, pieces)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    want = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc["offset_mapping"]]
    got = encode_chat(tok, conv["messages"], tools=conv["tools"])
    assert got["input_ids"] == enc["input_ids"]          # the same text as the model's own template renders
    assert got["assistant_masks"] == want
    assert len(tok) == n_vocab                            # no token added
    return [i for i, m in zip(got["input_ids"], got["assistant_masks"]) if m]


@pytest.mark.parametrize("kind,head,end", [("demo", "<|assistant|>", "<|end|>"),
                                           ("chatml", "<|im_start|>assistant\n", "<|im_end|>")])
def test_plain_rendering_masks_replies_and_calls_not_schemas_or_results(kind, head, end):
    from stagewise.chat import chat_prompt, native_tools, training_template

    tok = tokenizer(kind)
    assert not native_tools(tok)
    conv = multi_call_chat(4)
    plain = plain_messages(conv["messages"], conv["tools"])
    text = tok.apply_chat_template(plain, tokenize=False)
    calls = plain[2]["content"]
    assert calls == ('<tool_call>{"name": "animal_food", "arguments": {"animal": "fox"}}</tool_call>\n'
                     '<tool_call>{"name": "add", "arguments": {"a": 4, "b": 3}}</tool_call>')
    assert plain[0]["role"] == "system" and plain[0]["content"].startswith("You are a helpful assistant.\n\n")
    assert '{"name":"convert"' in plain[0]["content"] and [m["role"] for m in plain][3:5] == ["tool", "tool"]
    pieces = [calls + end, "The fox eats fish. The answer is 7." + end]
    kept = tok.decode(check_mask(tok, conv, text, pieces))
    assert kept == "".join(pieces)
    assert "fish" not in tok.decode(check_mask(tok, conv, text, pieces)).split(end)[0]   # the result is masked
    training_template(tok)   # the tool probes render alike in the training template (else ChatTemplateError)
    prompt = chat_prompt(tok, conv["messages"][:2], conv["tools"])
    assert prompt == tok.apply_chat_template(plain[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(head)


def test_a_template_that_renders_tools_is_trained_in_its_own_format():
    from stagewise.chat import native_tools

    tok = tokenizer("qwen")
    assert native_tools(tok)
    conv = multi_call_chat(4)
    # arguments given as a JSON string reach the template as an object (what HF templates expect)
    text = tok.apply_chat_template(native_messages(conv["messages"]), tools=conv["tools"], tokenize=False)
    assert '"name": "animal_food"' in text.split("<tools>")[-1].split("</tools>")[0]   # Qwen's own system block
    calls = ('<tool_call>\n{"name": "animal_food", "arguments": {"animal": "fox"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 3}}\n</tool_call>')
    assert calls in text
    # TRL's Qwen2.5 training template marks the whole turn after `<|im_start|>assistant`, newlines included
    pieces = ["\n" + calls + "<|im_end|>\n", "\nThe fox eats fish. The answer is 7.<|im_end|>\n"]
    assert "<|im_start|>assistant" + pieces[0] in text
    kept = tok.decode(check_mask(tok, conv, text, pieces))
    assert "<tools>" not in kept and "fish\n" not in kept


def test_a_training_template_that_renders_tool_turns_otherwise_is_refused(tmp_path):
    from stagewise.chat import ChatTemplateError, training_template

    tok = tokenizer("demo")
    # right for system/user/assistant, wrong for tool turns: the tool probes catch it
    wrong = tmp_path / "t.jinja"
    wrong.write_text(
        "{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}<|assistant|>{% generation %}"
        "{{ message['content'] }}<|end|>{% endgeneration %}{%- elif message['role'] == 'tool' -%}<|user|>"
        "{{ message['content'] }}<|end|>{%- else -%}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
        "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
    with pytest.raises(ChatTemplateError, match="R1"):
        training_template(tok, wrong)


def test_tool_schemas_come_after_the_records_system_text_or_alone():
    conv = multi_call_chat(0)
    without = plain_messages(conv["messages"][1:], TOOLS)
    assert without[0]["role"] == "system" and without[0]["content"].startswith("Tools:\n<tools>\n{")
    assert plain_messages([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]


def test_sft_rows_keep_the_tools_and_train_on_the_calls(tmp_path):
    from stagewise.modeling import load_chats
    from stagewise.records import write_jsonl
    from tasks.sft import with_replay

    tok = tokenizer("demo")
    rec = multi_call_chat(2)
    write_jsonl(tmp_path / "chat.jsonl", [rec])
    chats, skipped = load_chats(tmp_path)
    assert chats[0]["tools"] == rec["tools"] and chats[0]["messages"][3]["tool_call_id"] == "c1"
    rows, _ = with_replay(tok, chats, tmp_path, 0.0, 0)
    kept = tok.decode([i for i, m in zip(rows[0]["input_ids"], rows[0]["assistant_masks"]) if m])
    assert kept.startswith('<tool_call>{"name": "animal_food"') and "<tools>" not in kept
