"""tokenizer — train a byte-level BPE (or a byte/char vocabulary) on the curated data.

Recipe: read every text the later stages will see (corpus, chat turns, preference pairs, verifiable
problems) → HF `tokenizers` BPE with a ByteLevel pre-tokenizer (nothing is ever out of vocabulary) →
wrap in `PreTrainedTokenizerFast` with the project's special tokens and chat template → save
atomically to data/07_tokenizer. `kind: char` keeps the 256-byte alphabet and learns no merges.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from stagewise.config import TokenizerConfig
from stagewise.modeling import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, publish_dir, read_jsonl
from stagewise.tools import has_tools, plain_messages


def iter_texts(curated_dir: Path):
    """Every string the model will be trained on, from whichever curated files exist."""
    curated_dir = Path(curated_dir)
    files = {k: curated_dir / f"{k}.jsonl" for k in ("corpus", "chat", "preference", "verifiable")}
    if not files["corpus"].exists():
        raise FileNotFoundError(f"{files['corpus']}: missing — the tokenizer trains on the curated corpus; "
                                "run the data steps first")
    for r in read_jsonl(files["corpus"], ["text"]):
        yield r["text"]
    if files["chat"].exists():
        for r in read_jsonl(files["chat"], ["messages"]):
            # a tool-use chat as the model will see it: schemas, calls and results (stagewise/tools.py)
            msgs = plain_messages(r["messages"], r.get("tools")) if has_tools(r) else r["messages"]
            for m in msgs:
                yield m.get("content", "")
    if files["preference"].exists():
        for r in read_jsonl(files["preference"], ["prompt", "chosen", "rejected"]):
            yield from (r["prompt"], r["chosen"], r["rejected"])
    if files["verifiable"].exists():
        for r in read_jsonl(files["verifiable"], ["prompt", "answer"]):
            yield r["prompt"]
    yield from rag_texts(curated_dir / "rag.jsonl")


def rag_texts(path: Path):
    """Open-book records (the raft step's input): their questions, answers and documents, and the reply
    markers the raft chats use, so the vocabulary covers what SFT reads."""
    if not path.exists():
        return
    from stagewise.rag import ANSWER, BEGIN, END

    for r in read_jsonl(path, ["question", "answer"]):
        # as often as the raft chats use them: frequent enough to become merges of their own
        yield f"{BEGIN} {END} {ANSWER}"
        yield from (r["question"], r["answer"], *(r.get("documents") or []), r.get("oracle_text") or "")


def train_tokenizer(cfg: TokenizerConfig, curated_dir: Path, out_dir: Path) -> dict:
    """Train and save a HF fast tokenizer (with chat template) to out_dir. Returns its stats."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(iter_texts(curated_dir))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # char: exactly the byte alphabet + specials, so the trainer has no room for merges.
    vocab_size = len(alphabet) + len(SPECIAL_TOKENS) if cfg.kind == "char" else cfg.vocab_size
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer.vocab_size={cfg.vocab_size} is below the byte alphabet + specials "
                         f"({len(alphabet) + len(SPECIAL_TOKENS)}); raise it in params.yaml")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1_000_000  # the model config holds the real limit

    sample = texts[:2000]
    n_tokens = sum(len(tok(t).input_ids) for t in sample)
    n_chars = sum(len(t) for t in sample)
    publish_dir(Path(out_dir), lambda d: tok.save_pretrained(d))
    return {"tokenizer_dir": str(out_dir), "kind": cfg.kind, "vocab_size": len(tok), "n_texts": len(texts),
            "chars_per_token": round(n_chars / max(n_tokens, 1), 3)}


@task(name="tokenizer")
def tokenizer_task(cfg: TokenizerConfig, curated_dir: Path, out_dir: Path) -> dict:
    """Train the tokenizer on the curated data."""
    return train_tokenizer(cfg, curated_dir, out_dir)
