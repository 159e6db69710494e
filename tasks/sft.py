"""sft — supervised fine-tuning on curated chat data (TRL SFTTrainer, assistant-only loss).

Recipe: load the parent (pretrain output, or `model.base`) → conversational dataset (plus, with
`sft.replay_ratio`, curated-corpus documents replayed against forgetting) → SFTTrainer with
the project chat template (its `{% generation %}` markers make only assistant tokens count) →
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

from stagewise.config import Config
from stagewise.launch import accelerated
from stagewise.modeling import (
    fit, publish_stage, arithmetic_accuracy, benchmarks_dir, checkpoint_dir, common_args, greedy_answers,
    heldout_texts, load_chats, load_parent, lora_config, mean_nll, normalize_answer, param_counts, progress_callback,
    read_jsonl, set_threads,
)
from tasks import step

# "The fox is red." / "The fox lives in the forest." / "The fox eats fish." / "The answer is 7."
FORMAT_RE = re.compile(r"^the [a-z ]+ (is|lives in the|eats) [a-z]+\.$|^the answer is -?\d+\.$")


def with_replay(tok, chats: list[dict], curated_dir: Path, ratio: float, seed: int) -> tuple[list[dict], int]:
    """Chats plus `ratio` corpus documents per chat, pre-tokenized into one dataset for SFTTrainer.

    TRL tokenizes a dataset of a single kind (all conversations or all text); a mix has to arrive
    tokenized. Chats get the same call TRL makes (the chat template's assistant mask: loss on the
    assistant's tokens only), documents an all-ones mask (loss on every token). TRL still builds
    the labels from `assistant_masks` and truncates to max_length.
    """
    import random

    n = round(ratio * len(chats))
    if n == 0:   # nothing to replay: the conversations go to TRL untokenized, as without replay
        return chats, 0
    path = Path(curated_dir) / "corpus.jsonl"
    docs = [r["text"] for r in read_jsonl(path, ["text"])]
    if not docs:
        raise ValueError(f"{path}: no documents to replay; set sft.replay_ratio: 0 or curate a corpus")
    rng = random.Random(seed)
    # n distinct documents; past the corpus size, every document about n/len(docs) times
    picked = [docs[i % len(docs)] for i in rng.sample(range(max(n, len(docs))), n)]
    rows = []
    for c in chats:
        enc = tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        rows.append({"input_ids": list(enc["input_ids"]), "assistant_masks": list(enc["assistant_masks"])})
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
    if (b / "arithmetic.jsonl").exists():
        items = read_jsonl(b / "arithmetic.jsonl", ["question", "answer"])[:limit]
        out["arithmetic_pass1"] = arithmetic_accuracy(model, tok, items)
    return out


@accelerated
def sft(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """Fine-tune the parent on chat data; save a full (merged) model to out_dir."""
    from trl import SFTConfig, SFTTrainer

    set_threads(cfg)
    s = cfg.sft
    out_dir = Path(out_dir)
    quant = None
    if s.peft == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    model, tok = load_parent(cfg, parent_dir)
    before = instruct_eval(model, tok, curated_dir, s.eval_limit)
    if quant is not None:
        model, _ = load_parent(cfg, parent_dir, quant)
    rows, skipped = load_chats(curated_dir)
    n_chats = len(rows)
    rows, n_replay = with_replay(tok, rows, curated_dir, s.replay_ratio, cfg.run.seed)

    from datasets import Dataset

    args = SFTConfig(
        **common_args(cfg, out_dir, report_to),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate if s.peft == "none" else s.lora_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio,
        max_length=s.max_length,
        # Pre-tokenized (replay) rows carry their own assistant_masks, which TRL applies anyway; the flag
        # only asks TRL to compute them from conversations.
        assistant_only_loss=n_replay == 0,
        packing=False,
        save_steps=s.save_steps,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora_config(cfg.sft.lora) if s.peft != "none" else None,
        callbacks=[progress_callback("sft")],
    )
    run = fit(trainer, out_dir)
    if run is None:
        return {}

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
        "n_replay": n_replay,
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
              cache_only: bool = False) -> tuple[Lineage, dict]:
    """Fine-tune the parent on curated chat (assistant-only loss); evaluate vs parent; register."""
    return run_stage(ctx, step("sft"), sft, cfg, parent, data_hash, cache_only=cache_only)
