"""pretrain — a causal LM from random init on the curated corpus (HF Trainer).

Recipe: tokenize documents, each ended by the end token → pack into fixed-length blocks → hold out a
slice of blocks for periodic eval → warmup + cosine LR → checkpoints beside out_dir (resumed after a
kill) → atomic save of a complete HF folder. Target: held-out general-text perplexity, reported
before (the untrained model) and after.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from prefect import task

from stagewise.stage import Lineage, RunContext, run_stage

from stagewise.config import Config
from stagewise.launch import launched, relaunch
from stagewise.modeling import (
    build_model, checkpoint_dir, common_args, final_metrics, heldout_texts, load_tokenizer, mean_nll,
    param_counts, perplexity, progress_callback, read_jsonl, save_model, set_threads, steps_run, train_with_resume,
)


def pack(tok, texts: list[str], block: int) -> list[list[int]]:
    """Concatenate tokenized documents (each + end token) and cut into equal blocks (no padding)."""
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False).input_ids:
        stream.extend(ids)
        stream.append(tok.eos_token_id)
    n = len(stream) // block
    return [stream[i * block:(i + 1) * block] for i in range(n)]


def pretrain(cfg: Config, tokenizer_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """Train the base model; save it (with tokenizer and chat template) to out_dir."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    if cfg.train.launcher == "accelerate" and not launched():
        return relaunch("pretrain", cfg, tokenizer_dir=tokenizer_dir, curated_dir=curated_dir, out_dir=out_dir,
                        report_to=report_to)
    set_threads(cfg)
    p = cfg.pretrain
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_dir)
    docs = [r["text"] for r in read_jsonl(Path(curated_dir) / "corpus.jsonl", ["text"])]
    random.Random(cfg.run.seed).shuffle(docs)
    n_eval = max(1, int(len(docs) * p.eval_fraction))
    train_blocks = pack(tok, docs[n_eval:], p.seq_len)
    eval_blocks = pack(tok, docs[:n_eval], p.seq_len)[: p.max_eval_blocks]
    if not train_blocks:
        raise ValueError(f"{curated_dir}/corpus.jsonl: too little text for one {p.seq_len}-token block")

    model = build_model(cfg.model, tok, seed=cfg.run.seed)
    counts = param_counts(model)
    heldout = heldout_texts(curated_dir, p.heldout_limit)
    nll_before = mean_nll(model, tok, heldout, cfg.model.max_seq_len) if heldout else None

    args = TrainingArguments(
        **common_args(cfg, out_dir, report_to),
        max_steps=p.max_steps,
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=p.warmup_ratio,          # a float < 1 is a ratio of max_steps in transformers 5
        weight_decay=p.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=p.eval_steps,
        save_steps=p.save_steps,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": train_blocks}),
        eval_dataset=Dataset.from_dict({"input_ids": eval_blocks}),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        callbacks=[progress_callback("pretrain")],
    )
    t0 = time.perf_counter()
    out, resumed = train_with_resume(trainer, checkpoint_dir(out_dir))
    wall = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return {}
    metrics = final_metrics(trainer, out)
    metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    tokens = trainer.state.num_input_tokens_seen
    model.config.use_cache = True
    nll_after = mean_nll(model, tok, heldout, cfg.model.max_seq_len) if heldout else None

    result = {
        "model_dir": str(out_dir),
        "train_metrics": metrics,
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed,
        "steps_run": steps_run(trainer, resumed),
        **counts,
        "architecture": cfg.model.architecture,
        "tokens_seen": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "train_blocks": len(train_blocks),
        "heldout_ppl_before": perplexity(nll_before) if nll_before is not None else None,
        "heldout_ppl": perplexity(nll_after) if nll_after is not None else None,
        "wall_s": wall,
    }
    save_model(model, tok, out_dir, info={"stage": "pretrain", **result})
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)
    return result


@task(name="pretrain")
def pretrain_task(ctx: RunContext, cfg: Config, parent: Lineage, data_hash: str | None,
              cache_only: bool = False) -> tuple[Lineage, dict]:
    """Pretrain from the random init on the curated corpus; evaluate vs the init; register."""
    return run_stage(ctx, "pretrain", pretrain, cfg, parent, data_hash, cache_only=cache_only)
