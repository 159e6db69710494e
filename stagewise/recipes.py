"""Stage recipes that transfer: what a training setting left at `auto` becomes, from the data and the model.

A setting tuned on one world (the demo's 600 pretraining steps, 6 SFT epochs) does not carry over to
another corpus or another model width. Left at `auto`, a setting is derived here, by pure functions of
numbers measured on the run's curated data and its model (`Facts`):

- pretraining steps from a token budget: `recipe.tokens_per_param` tokens per parameter (Chinchilla's
  ~20), capped at `recipe.pretrain_max_epochs` passes over the corpus (repeating data stops paying off
  after a few epochs: Muennighoff et al. 2023), at least `recipe.min_steps.pretrain`;
- SFT / DPO epochs from the dataset size: enough epochs for `recipe.min_steps.<stage>` optimizer steps,
  between `recipe.min_epochs` and `recipe.max_epochs.<stage>` (small sets get more passes, large ones one);
- GRPO steps: every training problem drawn `recipe.reasoning_passes` times;
- learning rates scaled with model width, lr = ref_lr · ref_width / width (muP's rule for Adam on hidden
  matrices), the reference being the width the reference rates were tuned at (the demo model, 128);
- warm-up of 2 / (1 − β2) steps (Ma & Yarats 2021: Adam's second-moment estimate needs that long),
  at most `recipe.max_warmup_ratio` of the run;
- early stopping on held-out loss (transformers' EarlyStoppingCallback) with an evaluation every
  1/`recipe.evals_per_run` of the run.

While `data.sources` is empty (the built-in demo world) an `auto` setting takes the value tuned on that
world, `recipe.demo_world` (profiles pin their own there): the demo's numbers do not move. The resolved
values are what a stage's cache key, MLflow params and params.resolved.yaml see. docs/training.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stagewise.errors import ConfigError

AUTO = "auto"

# The settings that may be `auto`, per section (each has a rule below and a demo-world value).
AUTO_FIELDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("max_steps", "learning_rate", "warmup_ratio", "eval_steps", "save_steps", "early_stopping_patience"),
    "sft": ("epochs", "learning_rate", "warmup_ratio", "eval_steps", "save_steps", "early_stopping_patience"),
    "preference": ("epochs", "learning_rate"),
    "reasoning": ("max_steps", "learning_rate"),
}

# Adam's β2 as each stage runs it: pretraining sets 0.95 (tasks/pretrain.py), the TRL stages keep HF's 0.999.
ADAM_BETA2 = {"pretrain": 0.95, "sft": 0.999, "preference": 0.999, "reasoning": 0.999}


@dataclass(frozen=True)
class Facts:
    """What the rules are functions of, measured on the run's curated data and model."""

    width: int                     # hidden size of the model the stages train
    params: int | None = None      # parameters of the model pretraining builds (None: no pretraining)
    corpus_tokens: int | None = None   # tokens of the curated corpus pretraining trains on
    chats: int = 0                 # curated chats (+ the raft step's open-book chats)
    pairs: int = 0                 # curated preference pairs
    problems: int = 0              # curated verifiable problems


@dataclass(frozen=True)
class Resolved:
    setting: str                   # "pretrain.max_steps"
    value: Any
    why: str                       # the rule with its numbers, for the run log

    def line(self) -> str:
        return f"{self.setting}: auto → {self.value} ({self.why})"


# ---------------------------------------------------------------- the rules (pure)
def pretrain_tokens(params: int, corpus_tokens: int, tokens_per_param: float, max_epochs: float) -> int:
    """The pretraining token budget: tokens_per_param × params, at most max_epochs passes over the corpus."""
    return int(min(tokens_per_param * params, max_epochs * corpus_tokens))


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int, min_steps: int) -> int:
    """Optimizer steps that consume `tokens` in batches of batch_size × seq_len, at least min_steps."""
    return max(min_steps, math.ceil(tokens / (batch_size * seq_len)))


def epochs_for_rows(rows: int, batch_size: int, min_steps: int, min_epochs: float, max_epochs: float) -> float:
    """Epochs that give at least min_steps optimizer steps over `rows` examples, within [min_epochs, max_epochs]
    (rounded to a tenth: an epoch count is read by people)."""
    if rows <= 0:
        return min_epochs
    want = min_steps * batch_size / rows
    return round(min(max_epochs, max(min_epochs, want)), 1)


def steps_of_epochs(rows: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(rows / batch_size) * epochs)


def sft_eval_rows(chats: int, fraction: float) -> int:
    """Chats SFT holds out for its early-stopping loss: `fraction` of them, at least 8, never all."""
    return min(max(8, round(chats * fraction)), max(chats - 1, 0))


def width_lr(ref_lr: float, ref_width: int, width: int) -> float:
    """muP's Adam rule for hidden weights: the learning rate scales as 1/width from the reference width."""
    return float(f"{ref_lr * ref_width / width:.3g}")


def warmup_ratio(steps: float, beta2: float, max_ratio: float) -> float:
    """2 / (1 − β2) warm-up steps (untuned warm-up for Adam, Ma & Yarats 2021), as a ratio of the run,
    at most max_ratio."""
    return round(min(max_ratio, (2.0 / (1.0 - beta2)) / max(steps, 1.0)), 4)


def eval_every(steps: int, evals_per_run: int) -> int:
    """Evaluate (and checkpoint: the best model is loaded at the end) evals_per_run times per run."""
    return max(1, math.ceil(steps / evals_per_run))


def reasoning_steps(problems: int, batch_size: int, num_generations: int, passes: float, min_steps: int) -> int:
    """GRPO steps that draw every training problem `passes` times (batch_size / num_generations per step)."""
    per_step = max(1, batch_size // num_generations)
    return max(min_steps, math.ceil(passes * problems / per_step))


# ---------------------------------------------------------------- config plumbing
def is_auto(v: Any) -> bool:
    return isinstance(v, str) and v == AUTO


def unresolved(cfg) -> list[str]:
    """The settings still `auto` in cfg ("sft.epochs", ...)."""
    return [f"{s}.{k}" for s, keys in AUTO_FIELDS.items() for k in keys if is_auto(getattr(cfg.section(s), k))]


def _set(cfg, updates: dict[str, dict[str, Any]]):
    """A copy of cfg with section fields replaced (validated like the file: a rule cannot write nonsense)."""
    raw = cfg.to_dict()
    for section, values in updates.items():
        raw[section].update(values)
    return type(cfg).model_validate(raw)


def pin_demo_world(cfg):
    """`auto` settings → the values tuned on the built-in demo world (`recipe.demo_world`), while the run
    uses that world (`data.sources` empty). Pure config: the demo and smoke profiles resolve at load."""
    if cfg.data.sources or not cfg.recipe.use_demo_world_values:
        return cfg
    updates: dict[str, dict[str, Any]] = {}
    for section, values in cfg.recipe.demo_world.items():
        for k, v in values.items():
            if is_auto(getattr(cfg.section(section), k)):
                updates.setdefault(section, {})[k] = v
    return _set(cfg, updates) if updates else cfg


def check_demo_world(demo_world: dict[str, dict[str, Any]]) -> None:
    """recipe.demo_world may only name settings that can be `auto` (a typo would pin nothing)."""
    for section, values in demo_world.items():
        if section not in AUTO_FIELDS:
            raise ValueError(f"recipe.demo_world.{section}: no auto settings in section {section!r} "
                             f"(sections with auto settings: {', '.join(AUTO_FIELDS)})")
        for k in values:
            if k not in AUTO_FIELDS[section]:
                raise ValueError(f"recipe.demo_world.{section}.{k}: not a setting that can be auto "
                                 f"({', '.join(AUTO_FIELDS[section])})")


def resolve(cfg, facts: Facts) -> tuple[Any, list[Resolved]]:
    """Every `auto` setting of cfg → its rule's value. Returns (resolved cfg, what each became and why)."""
    rc = cfg.recipe
    out: list[Resolved] = []
    updates: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any, why: str) -> Any:
        updates.setdefault(section, {})[key] = value
        out.append(Resolved(f"{section}.{key}", value, why))
        return value

    def cur(section: str, key: str) -> Any:
        return updates.get(section, {}).get(key, getattr(cfg.section(section), key))

    def lr(section: str) -> None:
        if is_auto(cfg.section(section).learning_rate):
            ref = rc.reference_lr[section]
            put(section, "learning_rate", width_lr(ref, rc.reference_width, facts.width),
                f"{ref:g} × reference width {rc.reference_width} / width {facts.width}")

    p = cfg.pretrain
    if is_auto(p.max_steps):
        if facts.params is None or facts.corpus_tokens is None:
            raise ValueError("pretrain.max_steps: auto needs the model's parameter count and the corpus tokens")
        tokens = pretrain_tokens(facts.params, facts.corpus_tokens, rc.tokens_per_param, rc.pretrain_max_epochs)
        steps = steps_for_tokens(tokens, p.batch_size, p.seq_len, rc.min_steps["pretrain"])
        put("pretrain", "max_steps", steps,
            f"min({rc.tokens_per_param:g} tokens/param × {facts.params:,} params, {rc.pretrain_max_epochs:g} epochs × "
            f"{facts.corpus_tokens:,} corpus tokens) = {tokens:,} tokens / ({p.batch_size}×{p.seq_len}) per step, "
            f"at least {rc.min_steps['pretrain']}")
    steps = cur("pretrain", "max_steps")
    lr("pretrain")
    if is_auto(p.warmup_ratio) and not is_auto(steps):
        put("pretrain", "warmup_ratio", warmup_ratio(steps, ADAM_BETA2["pretrain"], rc.max_warmup_ratio),
            f"2/(1-β2={ADAM_BETA2['pretrain']}) steps of {steps}, at most {rc.max_warmup_ratio:g}")
    if is_auto(p.eval_steps) and not is_auto(steps):
        put("pretrain", "eval_steps", eval_every(steps, rc.evals_per_run), f"{steps} steps / {rc.evals_per_run} evaluations")
    if is_auto(p.save_steps):
        # load_best_model_at_end needs a checkpoint at every evaluation
        put("pretrain", "save_steps", cur("pretrain", "eval_steps"), "= eval_steps (the best checkpoint is kept)")
    if is_auto(p.early_stopping_patience):
        put("pretrain", "early_stopping_patience", rc.early_stopping_patience,
            f"stop after {rc.early_stopping_patience} evaluations without a lower held-out loss; keep the best")

    s = cfg.sft
    if is_auto(s.early_stopping_patience):
        put("sft", "early_stopping_patience", rc.early_stopping_patience,
            f"stop after {rc.early_stopping_patience} evaluations without a lower held-out loss on "
            f"{s.eval_fraction:g} of the chats; keep the best")
    chats = facts.chats
    if cur("sft", "early_stopping_patience"):
        chats -= sft_eval_rows(facts.chats, s.eval_fraction)   # held out for the early-stopping loss
    sft_rows = round(chats * (1 + s.replay_ratio))   # replayed documents are rows too
    if is_auto(s.epochs):
        put("sft", "epochs", epochs_for_rows(sft_rows, s.batch_size, rc.min_steps["sft"], rc.min_epochs,
                                              rc.max_epochs["sft"]),
            f"{rc.min_steps['sft']} steps × batch {s.batch_size} / {sft_rows:,} rows ({chats:,} chats + "
            f"replay {s.replay_ratio:g}), within [{rc.min_epochs:g}, {rc.max_epochs['sft']:g}] epochs")
    lr("sft")
    total = s.max_steps if s.max_steps > 0 else steps_of_epochs(sft_rows, s.batch_size, cur("sft", "epochs"))
    if is_auto(s.warmup_ratio):
        put("sft", "warmup_ratio", warmup_ratio(total, ADAM_BETA2["sft"], rc.max_warmup_ratio),
            f"2/(1-β2={ADAM_BETA2['sft']}) steps of {total:g}, at most {rc.max_warmup_ratio:g}")
    if is_auto(s.eval_steps):
        put("sft", "eval_steps", eval_every(math.ceil(total), rc.evals_per_run),
            f"{math.ceil(total)} steps / {rc.evals_per_run} evaluations")
    if is_auto(s.save_steps):
        put("sft", "save_steps", cur("sft", "eval_steps"), "= eval_steps (the best checkpoint is kept)")

    pc = cfg.preference
    if is_auto(pc.epochs):
        put("preference", "epochs", epochs_for_rows(facts.pairs, pc.batch_size, rc.min_steps["preference"],
                                                     rc.min_epochs, rc.max_epochs["preference"]),
            f"{rc.min_steps['preference']} steps × batch {pc.batch_size} / {facts.pairs:,} pairs, within "
            f"[{rc.min_epochs:g}, {rc.max_epochs['preference']:g}] epochs")
    lr("preference")

    r = cfg.reasoning
    if is_auto(r.max_steps):
        put("reasoning", "max_steps", reasoning_steps(facts.problems, r.batch_size, r.num_generations,
                                                       rc.reasoning_passes, rc.min_steps["reasoning"]),
            f"{rc.reasoning_passes:g} passes × {facts.problems:,} problems / {max(1, r.batch_size // r.num_generations)} "
            f"problems per step, at least {rc.min_steps['reasoning']}")
    lr("reasoning")
    return (_set(cfg, updates) if updates else cfg), out


def check(cfg) -> None:
    """Settings that are valid alone but not together, in a resolved cfg (no `auto` left: `resolve`):
    raised before any stage starts, naming the settings, rather than from inside the stage that would
    trip on them."""
    for section in ("pretrain", "sft"):
        if section == "pretrain" and cfg.model.base:
            continue   # a given base replaces pretraining: its settings are not used
        c = cfg.section(section)
        if not c.early_stopping_patience:
            continue
        # early stopping keeps the best checkpoint (load_best_model_at_end): one must exist at every evaluation
        if c.save_steps % c.eval_steps:
            raise ConfigError(f"{section}.early_stopping_patience needs a checkpoint at every evaluation: "
                              f"{section}.save_steps ({c.save_steps}) must be a multiple of {section}.eval_steps "
                              f"({c.eval_steps}); set both to the same number, or both to auto")
    for section in ("pretrain", "sft", "preference", "reasoning"):
        c = cfg.section(section)
        n = c.resources.num_workers
        if c.batch_size % n:   # stagewise.launch.rank_batch: one optimizer step's batch, split over the ranks
            raise ConfigError(f"{section}.batch_size ({c.batch_size}) does not split over {section}.resources."
                              f"num_workers ({n}) ranks: make it a multiple of {n}")
    if cfg.ops.engine == "ray" and cfg.train.launcher == "accelerate":
        raise ConfigError("ops.engine: ray runs the training stages on Ray Train, placed by <stage>.resources; "
                          "train.launcher: accelerate is the one-host launcher without Ray: set train.launcher: "
                          "inprocess (or ops.engine: local)")

