"""Offline fixtures for the evaluation tests: a workspace with benchmarks and a tiny random Llama.

Nothing is loaded from a hub: the tokenizer is a byte-level BPE trained here on the benchmark texts,
the model a LlamaForCausalLM built from a small config.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.config import GenerateConfig
# The project's chat format and special tokens, so evals see what training produces.
from stagewise.modeling import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS
from stagewise.workspace import Workspace
from tasks.generate import generate

REPO = Path(__file__).resolve().parents[1]


def eval_workspace(root: Path, n_eval: int = 30) -> Workspace:
    """A workspace with generated benchmarks and the demo sets compiled into its evals/ (what
    `evaluate()` reads without a `tasks_dir`)."""
    from stagewise.config import Config
    from stagewise.evalsets import plan, write_tasks

    ws = Workspace.at(root)
    generate(GenerateConfig(n_eval=n_eval, n_docs=40, n_junk=6, n_exact_dup=2, n_near_dup=2, n_leaks=2,
                            n_chat=40, n_preference=30, n_verifiable=40), ws.raw)
    write_tasks(plan(Config(), ws.root), ws.evals)
    return ws


def texts_of(ws: Workspace) -> list[str]:
    out = []
    for f in sorted(ws.benchmarks.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out += [v if isinstance(v, str) else " ".join(v) for k, v in r.items()
                    if k != "id" and isinstance(v, (str, list))]
    return out


def make_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS, pad_token=PAD,
                                   additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_model(model, tokenizer, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def memorize(model, tokenizer, conversations: list[list[dict]], steps: int = 120, lr: float = 3e-3, seed: int = 0):
    """Overfit a tiny model on a few chats so that greedy answers are right: a model that *should*
    score high, to check the whole generate → stop → filter → exact_match path end to end."""
    import torch

    torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def benchmark_chats(ws: Workspace, name: str) -> list[list[dict]]:
    rows = [json.loads(x) for x in (ws.benchmarks / f"{name}.jsonl").read_text().splitlines()]
    if name == "preference":
        return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}] for r in rows]
    answer = (lambda r: f"The answer is {r['answer']}.") if name.startswith("arithmetic") else (lambda r: r["answer"])
    return [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": answer(r)}] for r in rows]
