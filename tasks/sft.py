"""sft — supervised fine-tuning on curated chat data (TRL SFTTrainer, assistant-only loss).

Recipe: load the parent (pretrain output, or `model.base`) → conversational dataset (plus, with
`sft.replay_ratio`, curated-corpus documents replayed against forgetting) → SFTTrainer on chats in
the model's own chat template, pre-tokenized with its assistant mask (stagewise/chat.py: only the
assistant's tokens and end-of-turn count) →
optional LoRA / QLoRA (bitsandbytes NF4 base) → LoRA merged into a full fp32 model for the next stage,
the adapter kept under out_dir/adapter/ → atomic save. Target: held-out instruct exact match and
format compliance, parent → child.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from prefect import task

from stagewise.stage import Lineage, RunContext, run_stage

from stagewise.chat import encode_chat
from stagewise.config import Config
from stagewise.launch import on_ranks, rank_batch
from stagewise.modeling import (
    fit, publish_stage, arithmetic_accuracy, benchmarks_dir, checkpoint_dir, common_args, greedy_answers,
    heldout_texts, load_chats, load_parent, lora_config, mean_nll, normalize_answer, param_counts, progress_callback,
    raft_chats, read_jsonl, set_threads, token_f1,
)
from stagewise.recipes import sft_eval_rows
from tasks import step

# "The fox is red." / "The fox lives in the forest." / "The fox eats fish." / "The answer is 7."
FORMAT_RE = re.compile(r"^the [a-z ]+ (is|lives in the|eats) [a-z]+\.$|^the answer is -?\d+\.$")


def with_replay(tok, chats: list[dict], curated_dir: Path, ratio: float, seed: int) -> tuple[list[dict], int]:
    """Chats (plus `ratio` corpus documents per chat), pre-tokenized into one dataset for SFTTrainer.

    Chats are tokenized here, not by TRL: TRL's assistant-only loss patches only the templates it ships
    (SmolLM2's ChatML is not one), and a mix with documents has to arrive tokenized anyway. Chats get
    the model's own template with its assistant mask (stagewise.chat.encode_chat: loss on the
    assistant's tokens and end-of-turn only), documents an all-ones mask (loss on every token). TRL
    still builds the labels from `assistant_masks` and truncates to max_length.
    """
    import random

    rows = [encode_chat(tok, c["messages"], tools=c.get("tools")) for c in chats]
    n = round(ratio * len(chats))
    if n == 0:
        return rows, 0
    path = Path(curated_dir) / "corpus.jsonl"
    docs = [r["text"] for r in read_jsonl(path, ["text"])]
    if not docs:
        raise ValueError(f"{path}: no documents to replay; set sft.replay_ratio: 0 or curate a corpus")
    rng = random.Random(seed)
    # n distinct documents; past the corpus size, every document about n/len(docs) times
    picked = [docs[i % len(docs)] for i in rng.sample(range(max(n, len(docs))), n)]
    for text in picked:
        ids = tok(text + tok.eos_token)["input_ids"]
        rows.append({"input_ids": ids, "assistant_masks": [1] * len(ids)})
    rng.shuffle(rows)
    return rows, len(picked)


def instruct_eval(model, tok, curated_dir: Path, limit: int | None) -> dict:
    """Greedy exact match + format compliance on held-out instructions; arithmetic pass@1 too; and the
    held-out general-text NLL, the forgetting this stage can cause (what sft.replay_ratio counters)."""
    b = benchmarks_dir(curated_dir)
    if b is None or limit == 0:   # eval_limit: 0 switches the self-check off
        return {}
    out = {}
    texts = heldout_texts(curated_dir, limit)
    if texts:
        out["general_text_nll"] = mean_nll(model, tok, texts)
    if (b / "instruct.jsonl").exists():
        items = read_jsonl(b / "instruct.jsonl", ["question", "answer"])[:limit]
        got = greedy_answers(model, tok, [it["question"] for it in items])
        out["instruct_exact_match"] = sum(normalize_answer(g) == normalize_answer(it["answer"]) for g, it in zip(got, items)) / len(items)
        out["instruct_format"] = sum(bool(FORMAT_RE.match(normalize_answer(g))) for g in got) / len(items)
        out["instruct_token_f1"] = sum(token_f1(g, it["answer"]) for g, it in zip(got, items)) / len(items)
    if (b / "arithmetic.jsonl").exists():
        items = read_jsonl(b / "arithmetic.jsonl", ["question", "answer"])[:limit]
        out["arithmetic_pass1"] = arithmetic_accuracy(model, tok, items)
    return out


@on_ranks
def sft(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """Fine-tune the parent on chat data; save a full (merged) model to out_dir."""
    from trl import SFTConfig, SFTTrainer

    set_threads(cfg)
    s = cfg.sft
    out_dir = Path(out_dir)
    quant = None
    if s.peft == "qlora":
        from stagewise.compression.quantize import bnb_config, nf4_skip_modules

        # layers bitsandbytes' 4-bit CPU kernel cannot pack stay full precision (frozen all the same)
        quant = bnb_config("nf4", double_quant=False, skip_modules=nf4_skip_modules(parent_dir, None)[0])
    model, tok = load_parent(cfg, parent_dir)
    before = instruct_eval(model, tok, curated_dir, s.eval_limit)
    if quant is not None:
        model, _ = load_parent(cfg, parent_dir, quant)
    rows, skipped = load_chats(curated_dir)
    open_book = raft_chats(curated_dir)   # the raft step's chats train like any chat
    rows += open_book
    patience = s.early_stopping_patience
    eval_rows = []
    if patience:   # save_steps vs eval_steps: checked before the run (recipes.check)
        import random

        # held out for the early-stopping loss (assistant tokens only): a seeded shuffle, not the file order
        order = list(range(len(rows)))
        random.Random(cfg.run.seed).shuffle(order)
        n_eval = sft_eval_rows(len(rows), s.eval_fraction)
        eval_rows = [encode_chat(tok, rows[i]["messages"], tools=rows[i].get("tools")) for i in order[:n_eval]]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    n_chats = len(rows)
    rows, n_replay = with_replay(tok, rows, curated_dir, s.replay_ratio, cfg.run.seed)

    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    args = SFTConfig(
        **common_args(cfg, out_dir, report_to),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        per_device_train_batch_size=rank_batch(s.batch_size),
        learning_rate=s.learning_rate if s.peft == "none" else s.lora_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio,
        max_length=s.max_length,
        # The rows carry their own assistant_masks, which TRL applies anyway; the flag would only ask TRL
        # to compute them from conversations (with_replay).
        assistant_only_loss=False,
        packing=False,
        save_steps=s.save_steps,
        eval_strategy="steps" if patience else "no",
        eval_steps=s.eval_steps if patience else None,
        load_best_model_at_end=bool(patience),
        metric_for_best_model="eval_loss" if patience else None,
        greater_is_better=False if patience else None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tok,
        peft_config=lora_config(cfg.sft.lora) if s.peft != "none" else None,
        callbacks=[progress_callback("sft")]
        + ([EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []),
    )
    run = fit(trainer, out_dir)
    if run is None:
        return {}
    if patience and trainer.state.global_step < trainer.state.max_steps:
        run["stopped_early"] = (
            f"early stopping at step {trainer.state.global_step} of {trainer.state.max_steps}: held-out loss "
            f"({len(eval_rows)} chats) did not improve for {patience} evaluations; kept the best checkpoint "
            f"(step {trainer.state.best_global_step}, eval loss {trainer.state.best_metric:.4f})")

    adapter_tmp = None
    if s.peft != "none":
        # Merge into an fp32 copy of the parent (merging into NF4 weights would bake in the quantization).
        from peft import PeftModel

        adapter_tmp = checkpoint_dir(out_dir) / "adapter-final"
        trainer.model.save_pretrained(adapter_tmp)
        base, _ = load_parent(cfg, parent_dir)
        model = PeftModel.from_pretrained(base, adapter_tmp).merge_and_unload()
    else:
        model = trainer.model
    model = model.float()
    model.config.use_cache = True
    after = instruct_eval(model, tok, curated_dir, s.eval_limit)

    result = {
        "model_dir": str(out_dir),
        **run,
        **param_counts(model),
        "peft": s.peft,
        "n_train": n_chats,
        "n_eval_early_stopping": len(eval_rows),
        "n_replay": n_replay,
        "n_raft": len(open_book),
        "skipped": skipped,
        "before": before,
        "after": after,
    }

    def keep_adapter(d: Path) -> None:
        if adapter_tmp is not None:
            shutil.copytree(adapter_tmp, d / "adapter")

    return publish_stage(model, tok, out_dir, "sft", result, extra=keep_adapter)


@task(name="sft")
def sft_task(ctx: RunContext, cfg: Config, parent: Lineage, data_hash: str | None,
              cache_only: bool = False, accepted: list[Lineage] | None = None) -> tuple[Lineage, dict]:
    """Fine-tune the parent on curated chat (assistant-only loss); evaluate vs parent; register."""
    return run_stage(ctx, step("sft"), sft, cfg, parent, data_hash, cache_only=cache_only,
                     accepted=accepted)
