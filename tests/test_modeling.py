"""modeling: dense and MoE builds, atomic save, bf16 switch, answer parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stage_fixtures import curated, smoke_cfg, tokenizer_dir
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


def test_template_less_base_gets_the_default_on_its_own_tokens(tmp_path):
    """A plain pretrained LM (no chat template): the documented default template ends each assistant
    turn with the base's own EOS; nothing is added to the vocabulary, no embedding resized."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from stagewise.chat import DEFAULT_TEMPLATE, encode_chat, stop_token_ids
    from stagewise.modeling import load_parent

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the fox is red"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, tok2 = load_parent(smoke_cfg(), tmp_path / "base")
    assert tok2.chat_template == DEFAULT_TEMPLATE and len(tok2) == len(tok)
    assert tok2.eos_token == "</s>" and tok2.pad_token == "</s>"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.generation_config.eos_token_id == tok2.eos_token_id and stop_token_ids(tok2) == [tok2.eos_token_id]
    enc = encode_chat(tok2, [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "is red"}])
    masked = tok2.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert masked == " is red</s>"


def _plain_base(d: Path) -> Path:
    """A tiny plain pretrained LM folder (no chat template), built from a config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the fox is red. What is 2 plus 3? The answer is 5."] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    assert not tok.chat_template
    return d


def test_a_template_less_base_folder_starts_the_chain_with_the_default_template_saved(tmp_path):
    """The folder the pipeline starts from carries the template (a copy: the user's folder is not
    written to), so every evaluation's plain `AutoTokenizer.from_pretrained` renders the format
    training used, and every folder made from it (SFT here) keeps it."""
    from transformers import AutoTokenizer

    from stagewise.chat import DEFAULT_TEMPLATE
    from tasks.base import resolve_base
    from tasks.sft import sft

    user = _plain_base(tmp_path / "plain")
    before = sorted(p.name for p in user.iterdir())
    cfg = smoke_cfg(f"model.base={user}", "sft.max_steps=2", "sft.batch_size=2", "sft.eval_limit=2")
    base, sha = resolve_base(cfg, tmp_path / "models" / "base")
    assert base == tmp_path / "models" / "base" and sha is None
    assert sorted(p.name for p in user.iterdir()) == before   # untouched
    assert AutoTokenizer.from_pretrained(base).chat_template == DEFAULT_TEMPLATE
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(cfg, base)[0] == base and (base / "model.safetensors").stat().st_mtime_ns == stamp  # once
    out = tmp_path / "models" / "sft"
    res = sft(cfg, base, curated(), out)
    assert res["steps"] == 2
    assert AutoTokenizer.from_pretrained(out).chat_template == DEFAULT_TEMPLATE


def test_model_chat_template_is_the_format_of_a_template_less_base(tmp_path):
    from transformers import AutoTokenizer

    from stagewise.chat import encode_chat
    from tasks.base import resolve_base

    user = _plain_base(tmp_path / "plain")
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}<A>{% generation %}"
                     "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{%- else -%}<U>{{ m['content'] }}"
                     "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}<A>{%- endif -%}")
    base, _ = resolve_base(smoke_cfg(f"model.base={user}", f"model.chat_template={jinja}"), tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.chat_template == jinja.read_text()
    enc = encode_chat(tok, [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "is red"}],
                      jinja)
    assert tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]) == "is red</s>"
    # another template is another base folder, made again
    jinja.write_text(jinja.read_text().replace("<U>", "<User>"))
    base, _ = resolve_base(smoke_cfg(f"model.base={user}", f"model.chat_template={jinja}"), tmp_path / "base")
    assert "<User>" in AutoTokenizer.from_pretrained(base).chat_template


def test_an_unknown_template_is_an_error_naming_the_setting(tmp_path):
    """A template neither TRL nor stagewise can mark: the error names model.chat_template; a file given
    there is used only if it renders the model's own format."""
    from transformers import PreTrainedTokenizerFast

    from stagewise.chat import ChatTemplateError, encode_chat, prepare_tokenizer, training_template

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir())
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
    with pytest.raises(ChatTemplateError, match="model.chat_template"):
        training_template(tok)
    wrong = tmp_path / "wrong.jinja"
    wrong.write_text("{% for m in messages %}<{{ m['role'] }}>{% generation %}{{ m['content'] }}{% endgeneration %}"
                     "{% endfor %}")
    with pytest.raises(ChatTemplateError, match="does not render the model's own format"):
        training_template(tok, wrong)
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {% if m['role'] == 'assistant' %}{% generation %}"
                    "{{ m['content'] }}|{% endgeneration %}{% else %}{{ m['content'] }}|{% endif %}{% endfor %}")
    prepare_tokenizer(tok, good)   # what load_tokenizer does with model.chat_template
    enc = encode_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]).strip() == "a|"


def test_steady_tokens_per_s_leaves_the_first_step_out():
    """The progress callback's steady rate counts steps 2..N only: a slow first step (allocator,
    kernel selection) must not drag it down — it is what bench/train_speed.py compares with a bare loop."""
    import time
    from types import SimpleNamespace

    from stagewise.modeling import progress_callback

    cb, state = progress_callback("t"), SimpleNamespace(num_input_tokens_seen=0)
    cb.on_train_begin(None, state, None)
    t0 = time.perf_counter()
    for pause in (0.5, 0.01, 0.01):             # the first step is 50x slower than the others
        state.num_input_tokens_seen += 100
        time.sleep(pause)
        cb.on_step_end(None, state, None)
    overall = 300 / (time.perf_counter() - t0)
    assert cb.steady_tokens_per_s > 5 * overall    # ~200 tokens / 0.02 s vs 300 / 0.52 s
    assert cb.steady_tokens_per_s <= 200 / 0.02 * 1.01


def test_mean_nll_in_logit_budgeted_chunks_is_the_whole_batch_value(monkeypatch):
    """A 262k vocabulary must not hold a whole batch's logits: rows are scored a few at a time, and the
    number is the one the whole batch gives."""
    from stagewise import modeling

    tok = load_tokenizer(tokenizer_dir())
    model = build_model(smoke_cfg().model, tok).eval()
    texts = ["the fox is red", "a much longer sentence about the owl and the river bank", "hi"]
    enc = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding=True)
    with torch.no_grad():
        lp = torch.log_softmax(model(**enc).logits[:, :-1].float(), -1).gather(-1, enc.input_ids[:, 1:, None])[..., 0]
    mask = enc.attention_mask[:, 1:].bool()
    whole = float(-lp[mask].sum() / mask.sum())
    assert modeling.logit_rows(256, 262144) == 1 and modeling.logit_rows(96, 49152) == 14
    monkeypatch.setattr(modeling, "LOGITS_BUDGET_BYTES", 1)   # one row at a time
    assert modeling.mean_nll(model, tok, texts) == pytest.approx(whole, rel=1e-5)


def test_progress_lines_are_readable_and_the_repeated_last_eval_is_logged_once(caplog):
    """`[sft] step 10/114 loss 1.652 tokens/s 643` — not a raw trainer dict; the last step's evaluation
    arrives twice from the Trainer (eval strategy, then the end of training) and is shown once."""
    import logging
    from types import SimpleNamespace

    from stagewise.modeling import progress_callback

    cb = progress_callback("sft")
    state = SimpleNamespace(num_input_tokens_seen=0, is_world_process_zero=True, global_step=0, max_steps=20)
    cb.on_train_begin(None, state, None)
    with caplog.at_level(logging.INFO, logger="stagewise"):
        for step, logs in ((10, {"loss": 1.65171, "grad_norm": 3.0}), (20, {"eval_loss": 1.5771}),
                           (20, {"eval_loss": 1.5771})):
            state.global_step = step
            cb.on_log(None, state, None, logs=logs)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[sft]")]
    assert [ln.rsplit(" tokens/s", 1)[0] for ln in lines] == ["[sft] step 10/20 loss 1.652",
                                                              "[sft] step 20/20 eval_loss 1.577"]
    assert not any("{" in ln for ln in lines)


def test_a_short_fine_tune_prints_no_raw_trainer_dicts(tmp_path, capsys):
    """Issue 23 item 8: with tqdm off, HF's Trainer prints every log as a dict ({'loss': ...}) on stdout;
    the compressor's recovery / distillation fine-tunes (and the warm start) must not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagewise.compression.distill import fine_tune

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    res = fine_tune(model, torch.randint(0, 64, (8, 16)), steps=5, lr=1e-2, batch_size=4, seed=0, bf16=False,
                    work_dir=tmp_path / "ft")
    assert res["final_loss"] is not None and res["final_loss"] < res["first_loss"]
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "train_runtime" not in out, out
