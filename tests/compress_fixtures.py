"""Offline fixtures for the compression tests: a small workspace and a briefly trained tiny Llama.

The demo world (tasks/generate.py) provides curated corpus/chat stand-ins and benchmarks; the
tokenizer is a byte-level BPE trained here with HF `tokenizers`; the parent is a LlamaForCausalLM
from a small config trained a few steps on the corpus so its numbers mean something. Nothing is
loaded from a hub.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from stagewise.config import Config, GenerateConfig
from stagewise.workspace import Workspace
from tasks.generate import generate

TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def make_workspace(root: Path) -> Workspace:
    """data/01_raw from the generator; its corpus and chat copied as data/05_curated."""
    ws = Workspace.at(root)
    generate(GenerateConfig(n_docs=120, n_junk=0, n_exact_dup=0, n_near_dup=0, n_leaks=0, n_chat=120,
                            n_preference=10, n_verifiable=10, n_eval=20), ws.raw)
    ws.curated.mkdir(parents=True, exist_ok=True)
    for kind in ("corpus", "chat"):
        shutil.copy(ws.raw / f"{kind}.jsonl", ws.curated / f"{kind}.jsonl")
    # what curation keeps of the verifiable problems: integer answers (the generator plants junk too)
    rows = [json.loads(line) for line in (ws.raw / "verifiable.jsonl").read_text().splitlines() if line.strip()]
    (ws.curated / "verifiable.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows if str(r["answer"]).lstrip("-").isdigit()))
    return ws


def make_tokenizer(ws: Workspace, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stagewise.compression.data import curated_texts
    from stagewise.modeling import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS

    class _Plain:  # curated_texts only needs apply_chat_template to flatten chats
        @staticmethod
        def apply_chat_template(msgs, tokenize=False):
            return " ".join(m["content"] for m in msgs)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(curated_texts(ws, _Plain()), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tok, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                      **(TINY | overrides))
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def train_briefly(model, tok, ws: Workspace, steps: int = 40, lr: float = 3e-3, seed: int = 0):
    """A few AdamW steps on curated blocks (plain loop: a fixture, not a recipe)."""
    from stagewise.compression.data import curated_texts, lm_blocks

    blocks = lm_blocks(tok, curated_texts(ws, tok, seed=seed), 64, max_blocks=steps * 8)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        b = blocks[(i * 8) % len(blocks):][:8]
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def build(root: Path, steps: int = 40) -> tuple[Workspace, Path, Config]:
    """Workspace + trained parent saved at models/parent (safetensors + tokenizer) + a fast test config."""
    from stagewise.modeling import save_model

    ws = make_workspace(root)
    tok = make_tokenizer(ws)
    model = train_briefly(make_model(tok), tok, ws, steps)
    parent = save_model(model, tok, ws.model_dir("parent"))
    cfg = Config.model_validate({
        "run": {"threads": 2},
        "train": {"bf16": False},
        "compress": {"prune": {"recovery_steps": 4, "batch_size": 8, "seq_len": 64, "calibration_texts": 8},
                     "distill": {"steps": 6, "batch_size": 8, "seq_len": 64},
                     "gen_tokens": 8, "gen_repeats": 1, "eval_texts": 12},
    })
    return ws, parent, cfg


_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def compress_env(tmp_path_factory) -> tuple[Workspace, Path, Config]:
    """Built once per test session (shared by every test_compress_* module that imports it)."""
    if "env" not in _BUILT:
        _BUILT["env"] = build(tmp_path_factory.mktemp("compress"))
    return _BUILT["env"]


@contextlib.contextmanager
def cpu_4bit_kernel(avx512bf16: bool):
    """Make every Linear4bit built inside take bitsandbytes' AVX-512-BF16 CPU path (or not), whatever
    this CPU has: `Linear4bit.__init__` reads `has_avx512bf16()` into `support_avx512bf16_for_cpu`,
    and that path repacks the weight in eval mode (shapes it cannot pack raised there: issue 22)."""
    import bitsandbytes.nn.modules as bnb_modules

    saved = bnb_modules.has_avx512bf16
    bnb_modules.has_avx512bf16 = lambda: avx512bf16
    try:
        yield
    finally:
        bnb_modules.has_avx512bf16 = saved
