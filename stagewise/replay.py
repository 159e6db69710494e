"""Replay of the parent's own training mix inside a later stage (InstructGPT's PPO-ptx, Ouyang et al.
2022, eq. 2): γ × next-token loss on SFT chats and corpus blocks added to every optimizer step of a
trainer whose own loss knows nothing of general text (GRPO, DPO). TRL offers neither for these
trainers; its DPO `sft` loss type anchors on the chosen replies only, which is task data, not the text
the gate's general sets measure."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def replay_rows(tok, curated_dir: Path, cfg, docs_per_chat: float, batch_size: int, section: str) -> list[dict]:
    """What the parent was tuned on, as {input_ids, labels}: the SFT chats (loss on the assistant's tokens,
    cut to sft.max_length; compression's recovery data uses the same helper) and `docs_per_chat` corpus
    blocks per chat (pretrain.seq_len tokens, every token; whole documents packed, as pretraining saw
    them — documents cut at a length lose their endings, and general text with them). `section` names
    the settings in the errors (`reasoning`, `preference`)."""
    from stagewise.compression.data import chat_example
    from stagewise.modeling import load_chats, pack, read_jsonl

    chats, _ = load_chats(curated_dir)
    # a chat whose assistant turn lies past sft.max_length has nothing left to learn: None, left out
    rows = [e for e in (chat_example(tok, c["messages"], cfg.sft.max_length) for c in chats) if e is not None]
    path = Path(curated_dir) / "corpus.jsonl"
    blocks = pack(tok, [d["text"] for d in read_jsonl(path, ["text"])], cfg.pretrain.seq_len)
    want = round(docs_per_chat * len(rows))
    if want and not blocks:
        raise ValueError(f"{path}: no full block of {cfg.pretrain.seq_len} tokens to replay; curate more "
                         f"text or set {section}.replay_docs_per_chat: 0")
    rng = random.Random(cfg.run.seed)
    picked = [blocks[i % len(blocks)] for i in rng.sample(range(max(want, len(blocks))), want)] if want else []
    rows += [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in picked]
    if len(rows) < batch_size:   # batches of a smaller set would never fill
        raise ValueError(f"{Path(curated_dir) / 'chat.jsonl'} and {path}: {len(rows)} rows to replay, fewer than "
                         f"{section}.replay_batch_size={batch_size}; lower it or set {section}.replay_coef: 0")
    return rows


def with_replay(base, coef: float, rows: list[dict], batch_size: int, pad_id: int, seed: int):
    """`base` (a TRL trainer class) plus γ·(next-token loss on `rows`) on every training step. A resumed run
    restarts the row order (the rows are a regularizer, not a curriculum)."""
    from stagewise.compression.data import pad_collator

    class WithReplay(base):
        replay_losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return out
            loss = out[0] if return_outputs else out
            lm = model(**{k: v.to(loss.device) for k, v in next(stream).items()}).loss
            self.replay_losses.append(lm.item())
            loss = loss + coef * lm
            return (loss, *out[1:]) if return_outputs else loss

    WithReplay.__name__ = f"{base.__name__}WithReplay"

    def batches():
        collate, rng = pad_collator(pad_id), random.Random(seed)
        while True:
            order = list(range(len(rows)))
            rng.shuffle(order)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield collate([rows[j] for j in order[i:i + batch_size]])

    stream = batches()
    return WithReplay


def replay_ends(losses: list[float]) -> dict:
    """Mean next-token loss on the replayed rows over the first / last 10% of steps."""
    if not losses:
        return {}
    n = max(1, len(losses) // 10)
    return {"replay_loss_first": sum(losses[:n]) / n, "replay_loss_last": sum(losses[-n:]) / n}
