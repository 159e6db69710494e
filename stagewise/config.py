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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- run-wide settings
class RunConfig(Section):
    seed: int = 1234
    registered_model: str = "stagewise"
    # Order matters only for readability: the flow wires dependencies explicitly.
    stages: list[str] = Field(
        default_factory=lambda: [
            "generate", "ingest", "quality", "dedup", "decontaminate", "validate",
            "tokenizer", "pretrain", "sft", "preference", "reasoning", "compress", "gate",
        ]
    )
    threads: int = 2  # torch intra-op threads; the reference machine has 2 cores


class SourceConfig(Section):
    path: str
    format: Literal["jsonl", "parquet", "text", "hf_disk"] = "jsonl"
    kind: Literal["corpus", "chat", "preference", "verifiable"]


class DataConfig(Section):
    # Empty → the built-in demo world (`generate`). Otherwise name → source; one source per kind.
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    on_bad_rows: Literal["fail", "quarantine"] = "fail"


# ---------------------------------------------------------------- data steps
class GenerateConfig(Section):
    seed: int = 7
    n_docs: int = 1200           # clean pretraining documents
    n_junk: int = 40             # planted low-quality documents
    n_exact_dup: int = 30        # planted exact copies
    n_near_dup: int = 30         # planted near-duplicates (word 5-gram Jaccard ~0.8-0.9)
    n_leaks: int = 10            # planted verbatim leaks of benchmark items
    n_chat: int = 600
    n_preference: int = 400
    n_verifiable: int = 600
    n_eval: int = 100            # items per benchmark


class IngestConfig(Section):
    pass


class QualityConfig(Section):
    # Gopher quality (Rae et al. 2021); null disables a rule.
    gopher_min_words: int | None = 50
    gopher_max_words: int | None = 100_000
    gopher_min_mean_word_len: float | None = 3.0
    gopher_max_mean_word_len: float | None = 10.0
    gopher_max_symbol_word_ratio: float | None = 0.1
    gopher_min_alpha_words: float | None = 0.8
    gopher_min_stop_words: int | None = 2


class DedupConfig(Section):
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 42


class DecontaminateConfig(Section):
    ngram: int = 13
    short_ngram: int = 8
    short_coverage: float = 0.5
    mode: Literal["drop", "excise"] = "drop"


class ValidateConfig(Section):
    min_text_chars: int = 1


# ---------------------------------------------------------------- model and training
class TokenizerConfig(Section):
    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = 1024


class ModelConfig(Section):
    # A local HF folder (or a hub id, for users with network). When set, pretraining is skipped.
    base: str | None = None
    trust_remote_code: bool = False
    architecture: Literal["llama", "moe"] = "llama"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 256


class TrainConfig(Section):
    launcher: Literal["inprocess", "accelerate"] = "inprocess"
    bf16: Literal["auto", True, False] = "auto"  # auto: on where the CPU supports it


class PretrainConfig(Section):
    max_steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    eval_steps: int = 100
    save_steps: int = 100


class LoraConfigSection(Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class SFTConfig(Section):
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    max_length: int = 128
    peft: Literal["none", "lora", "qlora"] = "none"
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    save_steps: int = 50


class PreferenceConfig(Section):
    method: Literal["dpo", "rlhf"] = "dpo"
    epochs: float = 1.0
    batch_size: int = 8
    learning_rate: float = 5e-5
    beta: float = 0.1


class ReasoningConfig(Section):
    max_steps: int = 50
    num_generations: int = 4
    learning_rate: float = 1e-5


class CompressConfig(Section):
    methods: list[str] = Field(default_factory=list)


class EvaluateConfig(Section):
    batch_size: int = 16
    limit: int | None = None       # items per eval task; None = all
    bootstrap_iters: int = 1000
    # Extra lm-eval harness tasks by name (need network for their datasets).
    extra_tasks: list[str] = Field(default_factory=list)


class GateConfig(Section):
    require_target_improvement: bool = True
    general_max_drop_points: float = 3.0      # accuracy-like metrics, in points (0-100 scale)
    perplexity_max_rise_pct: float = 10.0     # perplexity-like metrics, relative


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
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

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def section(self, name: str) -> Section:
        return self.validate_ if name == "validate" else getattr(self, name)

    def section_hash(self, name: str) -> str:
        """Stable hash of one section: part of every stage's cache key and lineage."""
        return hash_obj(self.section(name).model_dump(mode="json"))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class ConfigError(ValueError):
    """A params.yaml problem, phrased for the person who has to fix it."""


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
    node[keys[-1]] = yaml.safe_load(value)  # "2" → 2, "null" → None, "[a,b]" → list


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or check its spelling (see docs/configuration.md)")
        else:
            lines.append(f"  - '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(
    path: str | Path = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Read params.yaml, merge a profile and `--set` overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (run from the project root or pass --config)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    profiles = raw.pop("profiles", {}) or {}
    raw.pop("profile", None)
    if profile:
        if profile not in profiles:
            raise ConfigError(f"{path}: unknown profile {profile!r}; defined: {', '.join(sorted(profiles)) or 'none'}")
        raw = _deep_merge(raw, profiles[profile] or {})
    for assignment in overrides or []:
        _apply_set(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path))) from None


def profiles_in(path: str | Path = "params.yaml") -> list[str]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return sorted((raw.get("profiles") or {}).keys())
