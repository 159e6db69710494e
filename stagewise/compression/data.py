"""Data for the compression recipes: calibration, recovery fine-tuning and distillation.

All of it is the pipeline's own curated data (data/05_curated), in two forms:
- `lm_blocks`: corpus documents and chat turns rendered through the chat template, packed into
  fixed-length blocks (no padding, every position a real token): calibration statistics and the
  plain causal-LM objective (`data: text`);
- `task_examples`: what the parent was actually trained on, stage by stage, in equal shares — corpus
  blocks (pretrain, loss on every token), chat conversations (sft) and verifiable problems answered
  in the taught format "The answer is N." (reasoning), the last two with loss on the assistant's
  tokens only, exactly as SFT masked them (`data: task`). A pruned or distilled model that is
  fine-tuned on generic text alone recovers its perplexity but not the behaviour the parent's
  later stages taught it.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from stagewise.workspace import Workspace


def curated_texts(ws: Workspace, tok, limit: int | None = None, seed: int = 0) -> list[str]:
    """Curated corpus documents + chat conversations (chat template applied), shuffled."""
    from stagewise.modeling import read_jsonl

    texts: list[str] = []
    corpus, chat = ws.curated / "corpus.jsonl", ws.curated / "chat.jsonl"
    if corpus.exists():
        texts += [r["text"] for r in read_jsonl(corpus, ["text"])]
    if chat.exists():
        texts += [tok.apply_chat_template(r["messages"], tokenize=False) for r in read_jsonl(chat, ["messages"])]
    if not texts:
        raise FileNotFoundError(f"{corpus} and {chat}: both missing — compression calibrates and fine-tunes on the "
                                "curated data; run the data steps first (stagewise run)")
    random.Random(seed).shuffle(texts)
    return texts[:limit] if limit else texts


def lm_blocks(tok, texts: list[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate texts (each closed by EOS) and cut into [n, seq_len] blocks of token ids."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + eos
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"not enough text for one block of {seq_len} tokens ({len(stream)} tokens)")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def chat_example(tok, messages: list[dict], max_len: int) -> dict | None:
    """Token ids of one conversation and labels on the assistant's tokens (the model's own template,
    end-of-turn included: stagewise.chat.encode_chat); None when no assistant token survives truncation."""
    from stagewise.chat import encode_chat

    enc = encode_chat(tok, messages)
    ids, mask = enc["input_ids"][:max_len], enc["assistant_masks"][:max_len]
    if not any(mask):
        return None
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor([i if m else -100 for i, m in zip(ids, mask)])}


def task_examples(ws: Workspace, tok, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """`n` training examples, round-robin over the parent's training sources (see the module
    docstring): corpus blocks, chat conversations, verifiable problems with their answer. A source
    that runs out starts over (reshuffled); a missing source is left out."""
    from stagewise.modeling import read_jsonl

    rng = random.Random(seed)
    sources: list[list[dict]] = []
    corpus, chat, ver = ws.curated / "corpus.jsonl", ws.curated / "chat.jsonl", ws.curated / "verifiable.jsonl"
    if corpus.exists():
        docs = [r["text"] for r in read_jsonl(corpus, ["text"])]
        rng.shuffle(docs)
        blocks = lm_blocks(tok, docs, seq_len, max_blocks=max(1, n // 3 + 1))
        sources.append([{"input_ids": b, "labels": b.clone()} for b in blocks])
    if chat.exists():
        ex = [chat_example(tok, r["messages"], seq_len) for r in read_jsonl(chat, ["messages"])]
        sources.append([e for e in ex if e is not None])
    if ver.exists():
        ex = [chat_example(tok, [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": f"The answer is {str(r['answer']).strip()}."}], seq_len)
              for r in read_jsonl(ver, ["prompt", "answer"])]
        sources.append([e for e in ex if e is not None])
    sources = [s for s in sources if s]
    if not sources:
        raise FileNotFoundError(f"{ws.curated}: no corpus.jsonl, chat.jsonl or verifiable.jsonl — compression fine-tunes "
                                "on the curated data; run the data steps first (stagewise run)")
    order = [list(range(len(s))) for s in sources]
    for o in order:
        rng.shuffle(o)
    out, pos = [], [0] * len(sources)
    while len(out) < n:
        k = len(out) % len(sources)
        if pos[k] == len(order[k]):
            rng.shuffle(order[k])
            pos[k] = 0
        out.append(sources[k][order[k][pos[k]]])
        pos[k] += 1
    return out


class ExampleDataset(torch.utils.data.Dataset):
    """Examples of unequal length ({input_ids, labels}); `pad_collator` batches them."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def pad_collator(pad_id: int):
    """Right-pad a batch: pad ids, labels -100, attention mask 0 on padding."""

    def collate(batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k], labels[i, :k], att[i, :k] = b["input_ids"], b["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": att}

    return collate


class BlockDataset(torch.utils.data.Dataset):
    """Causal-LM examples for HF Trainer: labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


def training_args(out_dir: Path, steps: int, lr: float, batch_size: int, seed: int, bf16: bool, **kw):
    """TrainingArguments for a short CPU fine-tune that keeps no checkpoints (the caller saves)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, seed=seed,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
        logging_steps=max(1, steps // 5), disable_tqdm=True, dataloader_num_workers=0, **kw,
    )
