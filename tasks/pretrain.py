"""pretrain — a causal LM from random init on the curated corpus (HF Trainer).

Recipe: tokenize documents, each ended by the end token → pack into fixed-length blocks → hold out a
slice of blocks for periodic eval → warmup + cosine LR → checkpoints beside out_dir (resumed after a
kill) → atomic save of a complete HF folder. Target: held-out general-text perplexity, reported
before (the untrained model) and after.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from stagewise.stage import Lineage, RunContext, run_stage

from stagewise.config import Config
from stagewise.launch import on_ranks, rank_batch
from stagewise.modeling import (
    fit, publish_stage, build_model, common_args, heldout_texts, load_tokenizer, mean_nll, pack, param_counts, split_corpus,
    perplexity, progress_callback, read_jsonl, set_threads,
)
from tasks import step


@on_ranks
def pretrain(cfg: Config, tokenizer_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """Train the base model; save it (with tokenizer and chat template) to out_dir."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, EarlyStoppingCallback, Trainer, TrainingArguments

    set_threads(cfg)
    p = cfg.pretrain
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_dir)
    docs = [r["text"] for r in read_jsonl(Path(curated_dir) / "corpus.jsonl", ["text"])]
    train_docs, eval_docs = split_corpus(docs, cfg.run.seed, p.eval_fraction)
    train_blocks = pack(tok, train_docs, p.seq_len)
    eval_blocks = pack(tok, eval_docs, p.seq_len)[: p.max_eval_blocks]
    if not train_blocks:
        raise ValueError(f"{curated_dir}/corpus.jsonl: too little text for one {p.seq_len}-token block")

    patience = p.early_stopping_patience   # save_steps vs eval_steps: checked before the run (recipes.check)
    model = build_model(cfg.model, tok, seed=cfg.run.seed)
    counts = param_counts(model)
    heldout = heldout_texts(curated_dir, p.heldout_limit)
    nll_before = mean_nll(model, tok, heldout, cfg.model.max_seq_len) if heldout else None

    args = TrainingArguments(
        **common_args(cfg, out_dir, report_to),
        max_steps=p.max_steps,
        per_device_train_batch_size=rank_batch(p.batch_size),
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
        # early stopping on the held-out blocks' loss: the best checkpoint is what the stage saves
        load_best_model_at_end=bool(patience),
        metric_for_best_model="eval_loss" if patience else None,
        greater_is_better=False if patience else None,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": train_blocks}),
        eval_dataset=Dataset.from_dict({"input_ids": eval_blocks}),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        callbacks=[progress_callback("pretrain")]
        + ([EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []),
    )
    run = fit(trainer, out_dir)
    final_eval = trainer.evaluate()   # under DDP a collective: every rank takes part, not only the one that reports
    if run is None:
        return {}
    if patience and trainer.state.global_step < p.max_steps:
        run["stopped_early"] = (
            f"early stopping at step {trainer.state.global_step} of {p.max_steps}: held-out loss did not improve "
            f"for {patience} evaluations; kept the best checkpoint (step {trainer.state.best_global_step}, "
            f"eval loss {trainer.state.best_metric:.4f})")
    run["train_metrics"].update({k: float(v) for k, v in final_eval.items() if isinstance(v, (int, float))})
    tokens = trainer.state.num_input_tokens_seen
    model.config.use_cache = True
    nll_after = mean_nll(model, tok, heldout, cfg.model.max_seq_len) if heldout else None

    result = {
        "model_dir": str(out_dir),
        **run,
        **counts,
        "architecture": cfg.model.architecture,
        "tokens_seen": tokens,
        "tokens_per_s": tokens / run["wall_s"] if run["wall_s"] > 0 else None,
        "train_blocks": len(train_blocks),
        "heldout_ppl_before": perplexity(nll_before) if nll_before is not None else None,
        "heldout_ppl": perplexity(nll_after) if nll_after is not None else None,
    }
    return publish_stage(model, tok, out_dir, "pretrain", result)


@task(name="pretrain")
def pretrain_task(ctx: RunContext, cfg: Config, parent: Lineage, data_hash: str | None,
              cache_only: bool = False, accepted: list[Lineage] | None = None) -> tuple[Lineage, dict]:
    """Pretrain from the random init on the curated corpus; evaluate vs the init; register."""
    return run_stage(ctx, step("pretrain"), pretrain, cfg, parent, data_hash, cache_only=cache_only,
                     accepted=accepted)
