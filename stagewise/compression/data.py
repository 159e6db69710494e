"""Text for the compression recipes: calibration, recovery fine-tuning and distillation.

All of it is the pipeline's own curated data (data/05_curated): corpus documents and chat turns
rendered through the model's chat template, packed into fixed-length blocks (no padding, so every
position is a real token for activation statistics and for the loss).
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
