"""reasoning — reinforcement learning from verifiable rewards (TRL GRPOTrainer).

Recipe: load the parent (preference output) → arithmetic word problems with checkable answers →
GRPO with two rewards: correctness (the parsed "The answer is N" / last integer equals the answer)
and format (the reply is exactly "The answer is N."), plus every step a next-token loss on the
parent's own training mix, chats and corpus (`replay_coef`, InstructGPT's PPO-ptx) → log the share
of groups whose rewards have no variance (they teach nothing) → atomic save. Self-check: held-out pass@1 (greedy), and pass@1 / pass@k from k
samples, on `arithmetic` (seen templates, unseen numbers) and `arithmetic_unseen` (unseen templates);
the gate's target is lm-eval's sampled pass@1 (evals/sw_arithmetic_sampled.yaml).
The SFT-on-solutions baseline for the side-by-side table is bench/sft_vs_rft.py.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import torch
from prefect import task

from stagewise.replay import replay_ends, replay_rows, with_replay
from stagewise.stage import Lineage, RunContext, run_stage

from stagewise.chat import stop_token_ids
from stagewise.config import Config
from stagewise.launch import on_ranks, rank_batch
from stagewise.modeling import (
    padding_side,
    fit, publish_stage, arithmetic_accuracy, benchmarks_dir, common_args, load_parent, param_counts,
    parse_answer, progress_callback, prompt_ids, read_jsonl, set_threads,
)
from tasks import step

log = logging.getLogger("stagewise")
FORMAT_RE = re.compile(r"^The answer is -?\d+\.$")


def _text(completion) -> str:
    # conversational completions arrive as [{"role": "assistant", "content": ...}]
    return completion[0]["content"] if isinstance(completion, list) else completion


def correctness_reward(completions, answer, **_) -> list[float]:
    """1.0 when the parsed answer equals the reference answer."""
    return [1.0 if parse_answer(_text(c)) == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def format_reward(completions, **_) -> list[float]:
    """1.0 when the reply is exactly the taught answer format."""
    return [1.0 if FORMAT_RE.match(_text(c).strip()) else 0.0 for c in completions]


def load_problems(curated_dir: Path) -> list[dict]:
    path = Path(curated_dir) / "verifiable.jsonl"
    rows = read_jsonl(path, ["prompt", "answer"])
    bad = [i for i, r in enumerate(rows, 1) if parse_answer(str(r["answer"])) != str(r["answer"]).strip()]
    if bad:
        raise ValueError(f"{path}:{bad[0]}: answer {rows[bad[0] - 1]['answer']!r} is not an integer "
                         f"({len(bad)} such rows); the verifiable reward needs integer answers — fix or curate them out")
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"]).strip()} for r in rows]


@torch.no_grad()
def sample_correct(model, tok, items: list[dict], k: int, temperature: float, max_new_tokens: int,
                   seed: int = 0, batch_items: int = 16) -> list[list[bool]]:
    """k sampled replies per problem (left-padded batches); which ones are correct."""
    model.eval()
    torch.manual_seed(seed)
    out = []
    with padding_side(tok, "left"):
        for i in range(0, len(items), batch_items):
            chunk = items[i:i + batch_items]
            enc = tok.pad({"input_ids": [prompt_ids(tok, it["question"]) for it in chunk for _ in range(k)]},
                          return_tensors="pt")
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=stop_token_ids(tok))
            replies = tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            for j, it in enumerate(chunk):
                out.append([parse_answer(r) == str(it["answer"]) for r in replies[j * k:(j + 1) * k]])
    return out


def arithmetic_eval(model, tok, curated_dir: Path, cfg: Config, with_sampling: bool = True) -> dict:
    """Held-out arithmetic, seen and unseen templates: greedy pass@1, and from k samples at the training
    temperature the unbiased pass@1 (mean correctness, Chen et al. 2021) and pass@k (any correct)."""
    b = benchmarks_dir(curated_dir)
    if b is None or cfg.reasoning.eval_limit == 0:
        return {}
    r = cfg.reasoning
    out = {}
    for name in ("arithmetic", "arithmetic_unseen"):
        if not (b / f"{name}.jsonl").exists():
            continue
        items = read_jsonl(b / f"{name}.jsonl", ["question", "answer"])[: r.eval_limit]
        out[f"{name}_greedy_pass1"] = arithmetic_accuracy(model, tok, items)
        if with_sampling and r.pass_k > 1:
            hits = sample_correct(model, tok, items, r.pass_k, r.temperature, r.max_completion_length, cfg.run.seed)
            out[f"{name}_pass1"] = sum(sum(h) / len(h) for h in hits) / len(hits)
            out[f"{name}_pass{r.pass_k}"] = sum(any(h) for h in hits) / len(hits)
    return out


def zero_variance_stop(steps: int, max_share: float):
    """Stop GRPO whose groups had (almost) no reward variance over its first `steps` steps.

    GRPO learns only from reward differences within a group; when (nearly) every group is all-wrong or
    all-right the advantage is zero and steps cost time without moving anything (the issue's run: 1,544 s
    at frac_reward_zero_std 1.0). Decided once, at the first log at or after `steps`, on the mean of the
    logged frac_reward_zero_std; `reason` says why it stopped (None: it did not)."""
    from transformers import TrainerCallback

    class ZeroVarianceStop(TrainerCallback):
        reason: str | None = None

        def __init__(self):
            self.seen: list[float] = []
            self.decided = False

        def on_log(self, args, state, control, logs=None, **kw):
            if self.decided or not logs or "frac_reward_zero_std" not in logs:
                return
            self.seen.append(float(logs["frac_reward_zero_std"]))
            if state.global_step < steps:
                return
            self.decided = True
            share = sum(self.seen) / len(self.seen)
            if share >= max_share:
                self.reason = (f"stopped at step {state.global_step}: {share:.0%} of reward groups had zero "
                               f"variance over the first {state.global_step} steps (>= reasoning.zero_variance_max="
                               f"{max_share:g}), so GRPO had nothing to reinforce; the parent solves (almost) "
                               "none or all of the problems — see reasoning.warm_start_below (docs/training.md)")
                log.warning("reasoning: %s", self.reason)
                control.should_training_stop = True

    return ZeroVarianceStop()


@on_ranks
def reasoning(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """GRPO with correctness + format rewards; save the model to out_dir."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    set_threads(cfg)
    r = cfg.reasoning
    out_dir = Path(out_dir)
    model, tok = load_parent(cfg, parent_dir)
    model, tok, warm = warm_start(cfg, parent_dir, curated_dir, out_dir, model, tok)
    rows = (replay_rows(tok, curated_dir, cfg, r.replay_docs_per_chat, r.replay_batch_size, "reasoning")
            if r.replay_coef > 0 else [])
    before = arithmetic_eval(model, tok, curated_dir, cfg)
    args = GRPOConfig(
        **common_args(cfg, out_dir, report_to),
        max_steps=r.max_steps,
        per_device_train_batch_size=rank_batch(r.batch_size),
        num_generations=r.num_generations,
        max_completion_length=r.max_completion_length,
        temperature=r.temperature,
        beta=r.beta,
        learning_rate=r.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.05,
        reward_weights=[1.0, r.format_weight],
        save_steps=r.save_steps,
        log_completions=False,
    )
    trainer_cls = GRPOTrainer
    stop = zero_variance_stop(r.zero_variance_steps, r.zero_variance_max)
    if r.replay_coef > 0:
        trainer_cls = with_replay(GRPOTrainer, r.replay_coef, rows, r.replay_batch_size, tok.pad_token_id, cfg.run.seed)
    trainer = trainer_cls(model=model, reward_funcs=[correctness_reward, format_reward], args=args,
                          train_dataset=Dataset.from_list(load_problems(curated_dir)), processing_class=tok,
                          callbacks=[progress_callback("reasoning"), stop])
    run = fit(trainer, out_dir)
    if run is None:
        return {}
    logs = [h for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    zero_std = [h["frac_reward_zero_std"] for h in logs]
    correct = [h["rewards/correctness_reward/mean"] for h in logs if "rewards/correctness_reward/mean" in h]
    rewards = [h["reward"] for h in logs if "reward" in h]
    model = trainer.model.float().eval()
    model.config.use_cache = True
    after = arithmetic_eval(model, tok, curated_dir, cfg)
    result = {
        "model_dir": str(out_dir),
        **run,
        **param_counts(model),
        "frac_zero_variance_groups": sum(zero_std) / len(zero_std) if zero_std else None,
        "stopped_early": stop.reason,
        "warm_start": warm,
        "train_correct_first": correct[0] if correct else None,
        "train_correct_last": correct[-1] if correct else None,
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None,
        # mean next-token loss on the replayed rows over the first / last 10% of steps
        **replay_ends(getattr(trainer, "replay_losses", [])),
        "before": before,
        "after": after,
    }
    return publish_stage(model, tok, out_dir, "reasoning", result)


def solve_rate(model, tok, cfg: Config, problems: list[dict]) -> float:
    """Share of sampled replies (reasoning.num_generations per problem, training temperature) that are right:
    what decides whether GRPO's groups have any reward variance to learn from."""
    r = cfg.reasoning
    items = [{"question": p["prompt"][-1]["content"], "answer": p["answer"]} for p in problems]
    hits = sample_correct(model, tok, items, r.num_generations, r.temperature, r.max_completion_length, cfg.run.seed)
    return sum(sum(h) for h in hits) / max(1, sum(len(h) for h in hits))


def warm_start(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path, model, tok):
    """R1-style cold start: when the parent solves fewer than `reasoning.warm_start_below` of sampled replies
    on `warm_start_probe` training problems, GRPO's groups are all-wrong and it cannot learn; fine-tune the
    parent first on the reference answers ("The answer is N.", the reward's format) of `warm_start_share`
    of the problems, assistant tokens only, for `reasoning.sft_epochs`.

    It is SFT, so it follows SFT's settings against forgetting: `sft.peft` (LoRA at `sft.lora_learning_rate`,
    merged after; full fine-tuning at `sft.learning_rate` otherwise) and `sft.replay_ratio` (curated-corpus
    documents mixed in, loss on every token). A full-FT warm start without replay took a real base's
    held-out word perplexity from 207 to 681 (issue 21). Before GRPO starts, held-out general text is
    checked: if its perplexity rose more than `reasoning.warm_start_max_ppl_rise_pct`, the warm start is undone
    (GRPO starts from the parent) and the report says so. Returns (model, tok, report)."""
    import random

    from transformers import Trainer

    from stagewise.compression.data import chat_example, pad_collator, training_args
    from stagewise.modeling import heldout_texts, lora_config, mean_nll, quiet, use_bf16, word_ppl_rise_pct

    r, s = cfg.reasoning, cfg.sft
    problems = load_problems(curated_dir)
    if r.warm_start_below <= 0 or not problems:
        return model, tok, None
    probe = random.Random(cfg.run.seed).sample(problems, min(r.warm_start_probe, len(problems)))
    before = solve_rate(model, tok, cfg, probe)
    report = {"solve_rate_before": round(before, 4), "threshold": r.warm_start_below, "probe_problems": len(probe),
              "ran": before < r.warm_start_below}
    if not report["ran"]:
        return model, tok, report
    picked = random.Random(cfg.run.seed + 1).sample(problems, max(1, round(r.warm_start_share * len(problems))))
    rows = [e for e in (chat_example(tok, p["prompt"] + [{"role": "assistant", "content": f"The answer is {p['answer']}."}],
                                     s.max_length) for p in picked) if e is not None]
    n_answers = len(rows)
    docs = [d["text"] for d in read_jsonl(Path(curated_dir) / "corpus.jsonl", ["text"])] \
        if (Path(curated_dir) / "corpus.jsonl").exists() else []
    n_replay = min(round(s.replay_ratio * n_answers), len(docs) * 4) if docs else 0
    rng = random.Random(cfg.run.seed + 2)
    for text in (docs[i % len(docs)] for i in rng.sample(range(max(n_replay, len(docs))), n_replay)):
        ids = torch.tensor(tok(text + tok.eos_token)["input_ids"][: s.max_length])
        rows.append({"input_ids": ids, "labels": ids.clone()})
    rng.shuffle(rows)
    batch = min(s.batch_size, len(rows))
    steps = max(1, round(r.sft_epochs * len(rows) / batch))
    texts = heldout_texts(curated_dir, s.eval_limit or None)
    nll_before = mean_nll(model, tok, texts) if texts else None
    log.warning("reasoning: parent solves %.1f%% of sampled replies (< %.0f%%): warm start, %d steps on %d "
                "reference answers + %d replayed documents first (%s)", 100 * before, 100 * r.warm_start_below,
                steps, n_answers, n_replay, "LoRA" if s.peft != "none" else "full fine-tuning")
    t0 = time.perf_counter()
    lora = s.peft != "none"
    work = Path(out_dir).parent / f"{Path(out_dir).name}.warm_start"
    trained = model
    if lora:   # a QLoRA SFT's NF4 base is not needed here: the parent is already a merged fp32 model
        from peft import get_peft_model

        trained = get_peft_model(model, lora_config(s.lora))
    trained.train()
    quiet(Trainer(model=trained, args=training_args(work, steps, s.lora_learning_rate if lora else s.learning_rate,
                                                    batch, cfg.run.seed, use_bf16(cfg.train)),
                  train_dataset=rows, data_collator=pad_collator(tok.pad_token_id))).train()
    shutil.rmtree(work, ignore_errors=True)
    if lora:   # GRPO fine-tunes every weight: get_peft_model froze the base and merging does not thaw it
        trained = trained.merge_and_unload().requires_grad_(True)
    trained = trained.float().eval()
    after = solve_rate(trained, tok, cfg, probe)
    report.update(solve_rate_after=round(after, 4), problems=n_answers, replayed_documents=n_replay, sft_steps=steps,
                  peft=s.peft, seconds=round(time.perf_counter() - t0, 1))
    if nll_before is not None:
        nll_after = mean_nll(trained, tok, texts)
        rise = word_ppl_rise_pct(nll_before, nll_after, tok, texts)
        report.update(general_ppl_rise_pct=round(rise, 2), general_texts=len(texts))
        if rise > r.warm_start_max_ppl_rise_pct:
            report["undone"] = (f"held-out general-text perplexity rose {rise:.1f}% (> reasoning.warm_start_max_ppl_rise_pct "
                                f"{r.warm_start_max_ppl_rise_pct:g}): GRPO starts from the parent")
            log.warning("reasoning: warm start %s", report["undone"])
            # the weights were trained in place (no second copy of a large model is kept): reload the parent
            return (*load_parent(cfg, parent_dir), report)
    return trained, tok, report


@task(name="reasoning")
def reasoning_task(ctx: RunContext, cfg: Config, parent: Lineage, data_hash: str | None,
              cache_only: bool = False, accepted: list[Lineage] | None = None) -> tuple[Lineage, dict]:
    """RL with verifiable rewards (GRPO) on the parent; evaluate vs parent; register."""
    return run_stage(ctx, step("reasoning"), reasoning, cfg, parent, data_hash, cache_only=cache_only,
                     accepted=accepted)
