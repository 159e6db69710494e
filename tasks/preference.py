"""preference — align the SFT model with preference pairs: DPO, or RLHF (reward model + PPO).

dpo: TRL DPOTrainer, reference = the SFT model (passed explicitly), optional LoRA merged before saving,
optional replay of the parent's training mix (`replay_coef`, stagewise/replay.py) against forgetting.
rlhf: TRL RewardTrainer trains a reward model from the SFT model (kept under out_dir/reward_model/),
then stagewise/ppo.py optimizes the policy against it with a KL penalty to the SFT model.
Targets (parent → child, held-out): chosen-over-rejected log-likelihood accuracy and margin; for rlhf
also the reward model's pairwise accuracy and the policy's win rate over the SFT model as judged by it.
"""

from __future__ import annotations

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
    fit, publish_stage, benchmarks_dir, checkpoint_dir, common_args, final_metrics, greedy_answers, load_parent,
    param_counts, preference_accuracy, progress_callback, prompt_ids, read_jsonl, save_model, set_threads,
    train_with_resume,
)
from tasks import step


def load_pairs(curated_dir: Path) -> list[dict]:
    """Conversational {prompt, chosen, rejected} (TRL's explicit-prompt preference format)."""
    path = Path(curated_dir) / "preference.jsonl"
    rows = read_jsonl(path, ["prompt", "chosen", "rejected"])
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def heldout_pairs(curated_dir: Path, limit: int | None) -> list[dict]:
    b = benchmarks_dir(curated_dir)
    if b is None or not (b / "preference.jsonl").exists():
        return []
    return read_jsonl(b / "preference.jsonl", ["prompt", "chosen", "rejected"])[:limit]


# ---------------------------------------------------------------- dpo
def dpo(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """Direct preference optimization against the parent as the frozen reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pc = cfg.preference
    model, tok = load_parent(cfg, parent_dir)
    held = heldout_pairs(curated_dir, pc.eval_limit)
    before = preference_accuracy(model, tok, held) if held else {}
    peft_config = None
    ref_model = None
    if pc.peft == "lora":
        from stagewise.modeling import lora_config

        peft_config = lora_config(cfg.sft.lora)   # the reference is the adapter-disabled model
    else:
        ref_model, _ = load_parent(cfg, parent_dir)   # explicit reference (a config-built model has no hub id)
    args = DPOConfig(
        **common_args(cfg, out_dir, report_to),
        num_train_epochs=pc.epochs,
        max_steps=pc.max_steps,
        per_device_train_batch_size=rank_batch(pc.batch_size),
        learning_rate=pc.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        beta=pc.beta,
        max_length=pc.max_length,
        save_steps=pc.save_steps,
    )
    trainer_cls = DPOTrainer
    if pc.replay_coef > 0:
        rows = replay_rows(tok, curated_dir, cfg, pc.replay_docs_per_chat, pc.replay_batch_size, "preference")
        trainer_cls = with_replay(DPOTrainer, pc.replay_coef, rows, pc.replay_batch_size, tok.pad_token_id, cfg.run.seed)
    trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(load_pairs(curated_dir)),
                          processing_class=tok, peft_config=peft_config, callbacks=[progress_callback("preference")])
    run = fit(trainer, out_dir)
    if run is None:
        return {}
    model = trainer.model
    if pc.peft == "lora":
        model = model.merge_and_unload()
    model = model.float().eval()
    after = preference_accuracy(model, tok, held) if held else {}
    if held:
        # DPO's implicit reward β·(Δ log π − Δ log π_ref), averaged over held-out pairs
        after["implicit_reward_margin"] = pc.beta * (after["margin"] - before["margin"])
    result = {"model_dir": str(out_dir), **run, **param_counts(model), "method": "dpo",
              **replay_ends(getattr(trainer, "replay_losses", [])), "before": before, "after": after}
    publish_stage(model, tok, out_dir, "preference", result)
    return result


# ---------------------------------------------------------------- rlhf
def reward_scores(rm, tok, prompts: list[str], replies: list[str], batch_size: int = 32) -> list[float]:
    """Reward-model score of each (prompt, reply) conversation, rendered like RewardTrainer renders it."""
    rm.eval()
    out = []
    with padding_side(tok, "right"):
        for i in range(0, len(prompts), batch_size):
            ids = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                           tokenize=True, return_dict=True)["input_ids"]
                   for p, r in zip(prompts[i:i + batch_size], replies[i:i + batch_size])]
            enc = tok.pad({"input_ids": ids}, return_tensors="pt")
            with torch.no_grad():
                out += rm(**enc).logits[:, 0].float().tolist()
    return out


def train_reward_model(cfg: Config, parent_dir: Path, curated_dir: Path, rm_dir: Path, report_to: str) -> tuple:
    """TRL RewardTrainer: a scalar head on the SFT model, Bradley–Terry loss on chosen vs rejected."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    rc = cfg.preference.reward
    tok = load_parent(cfg, parent_dir)[1]
    rm = AutoModelForSequenceClassification.from_pretrained(
        str(parent_dir), num_labels=1, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)
    rm.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        **common_args(cfg, rm_dir, report_to),
        num_train_epochs=rc.epochs,
        per_device_train_batch_size=rc.batch_size,
        learning_rate=rc.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=cfg.preference.max_length,
        save_steps=cfg.preference.save_steps,
    )
    trainer = RewardTrainer(model=rm, args=args, train_dataset=Dataset.from_list(load_pairs(curated_dir)),
                            processing_class=tok, callbacks=[progress_callback("preference/reward")])
    out, resumed = train_with_resume(trainer, checkpoint_dir(rm_dir))
    return trainer.model.float().eval(), tok, final_metrics(trainer, out), trainer.state.global_step, resumed


def pairwise_accuracy(rm, tok, held: list[dict]) -> float:
    c = reward_scores(rm, tok, [h["prompt"] for h in held], [h["chosen"] for h in held])
    r = reward_scores(rm, tok, [h["prompt"] for h in held], [h["rejected"] for h in held])
    return sum(a > b for a, b in zip(c, r)) / max(len(held), 1)


def rlhf(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """Reward model (RewardTrainer) then PPO (stagewise/ppo.py) with a KL penalty to the parent."""
    from stagewise.ppo import ppo_train

    pc, pp = cfg.preference, cfg.preference.ppo
    out_dir = Path(out_dir)
    work = checkpoint_dir(out_dir)
    rm_dir = work / "reward_model"
    t0 = time.perf_counter()
    rm, tok, rm_metrics, rm_steps, resumed = train_reward_model(cfg, parent_dir, curated_dir, rm_dir, report_to)
    held = heldout_pairs(curated_dir, pc.eval_limit)
    rm_acc = pairwise_accuracy(rm, tok, held) if held else None

    policy, _ = load_parent(cfg, parent_dir)
    before = preference_accuracy(policy, tok, held) if held else {}
    held_prompts = [h["prompt"] for h in held]
    sft_replies = greedy_answers(policy, tok, held_prompts) if held else []

    train_prompts = sorted({r["prompt"][0]["content"] for r in load_pairs(curated_dir)})
    prompt_tok = [prompt_ids(tok, p) for p in train_prompts]
    text_of = {tuple(ids): p for ids, p in zip(prompt_tok, train_prompts)}
    stop = set(stop_token_ids(tok))   # a turn ends at the template's end-of-turn token

    def reward_fn(prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        replies = [tok.decode(c, skip_special_tokens=True).strip() for c in completions]
        scores = reward_scores(rm, tok, [text_of[tuple(p)] for p in prompts], replies)
        # a completion cut off at max_new_tokens never ended its turn: penalize (RLHF implementation details)
        return [s - (pp.missing_eos_penalty if (not c or c[-1] not in stop) else 0.0) for s, c in zip(scores, completions)]

    ppo_out = ppo_train(policy, tok, reward_fn, prompt_tok, pp, seed=cfg.run.seed)
    if report_to == "mlflow":   # PPO curves next to the RewardTrainer's, in the caller's active run
        import mlflow

        for row in ppo_out["history"]:
            mlflow.log_metrics({f"ppo/{k}": float(v) for k, v in row.items() if k != "step"}, step=row["step"])
    wall = time.perf_counter() - t0

    after = preference_accuracy(policy, tok, held) if held else {}
    win = None
    if held:
        new_replies = greedy_answers(policy, tok, held_prompts)
        r_old = reward_scores(rm, tok, held_prompts, sft_replies)
        r_new = reward_scores(rm, tok, held_prompts, new_replies)
        win = sum(1.0 if b > a else 0.5 if b == a else 0.0 for a, b in zip(r_old, r_new)) / len(held)
        after["reward_mean"] = sum(r_new) / len(r_new)
        before["reward_mean"] = sum(r_old) / len(r_old)
    hist = ppo_out["history"]
    result = {
        "model_dir": str(out_dir),
        "train_metrics": {"reward_model": rm_metrics, "ppo_first": hist[0], "ppo_last": hist[-1],
                          "final_loss": hist[-1]["pg_loss"]},
        "steps": rm_steps + len(hist),
        "resumed_from_step": resumed,
        **param_counts(policy),
        "method": "rlhf",
        "reward_model_pairwise_accuracy": rm_acc,
        "win_rate_vs_parent": win,
        "before": before,
        "after": after,
        "wall_s": wall,
    }

    def keep_rm(d: Path) -> None:
        rm.save_pretrained(d / "reward_model", safe_serialization=True)
        tok.save_pretrained(d / "reward_model")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ppo_out["value_head"].items()}, d / "value_head.safetensors")

    save_model(policy, tok, out_dir, extra=keep_rm, info={"stage": "preference", **result})
    shutil.rmtree(work, ignore_errors=True)
    return result


# rlhf always runs in-process: stagewise/ppo.py is a single-process loop.
@on_ranks(when=lambda cfg: cfg.preference.method == "dpo")
def preference(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path, report_to: str = "none") -> dict:
    """Preference alignment of the SFT model (`preference.method`: dpo | rlhf)."""
    set_threads(cfg)
    fn = dpo if cfg.preference.method == "dpo" else rlhf
    return fn(cfg, Path(parent_dir), Path(curated_dir), Path(out_dir), report_to)


@task(name="preference")
def preference_task(ctx: RunContext, cfg: Config, parent: Lineage, data_hash: str | None,
              cache_only: bool = False, accepted: list[Lineage] | None = None) -> tuple[Lineage, dict]:
    """Preference-tune the parent (DPO, or reward model + PPO); evaluate vs parent; register."""
    return run_stage(ctx, step("preference"), preference, cfg, parent, data_hash, cache_only=cache_only,
                     accepted=accepted)
