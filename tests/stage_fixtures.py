"""Shared smoke-size chain for the training-stage tests: data → tokenizer → pretrain → sft → dpo.

Each link is built once per test session (lru_cache) in a temp workspace and reused by later
tests, so the whole training suite pays for each stage once. The curated layer is emulated by
dropping exactly the rows the generator's manifest marks as planted defects (junk, duplicates,
benchmark leaks) — the curation helpers' job, done here by the answer key.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from stagewise.config import Config, load_config
from tasks.generate import generate

ROOT = Path(__file__).resolve().parents[1]
# One thread: on a shared 2-core box oversubscribed OpenMP threads cost 10x; tiny models lose nothing.
SMOKE_SETS = ["run.threads=1", "train.bf16=false"]


def smoke_cfg(*sets: str) -> Config:
    return load_config(ROOT / "params.yaml", profile="smoke", overrides=[*SMOKE_SETS, *sets])


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="stagewise-train-"))
    atexit.register(shutil.rmtree, d, True)   # removed when the test session ends
    return d


@functools.lru_cache(maxsize=None)
def curated() -> Path:
    """data/05_curated-like folder (with data/01_raw/benchmarks beside it)."""
    root = workdir() / "data"
    raw, cur = root / "01_raw", root / "05_curated"
    generate(smoke_cfg().generate, raw)
    cur.mkdir(parents=True)
    manifest = json.loads((raw / "manifest.json").read_text())
    for kind, planted in manifest.items():
        drop = set().union(*(set(ids) for ids in planted.values()))
        rows = [line for line in (raw / f"{kind}.jsonl").read_text().splitlines()
                if json.loads(line)["id"] not in drop]
        (cur / f"{kind}.jsonl").write_text("\n".join(rows) + "\n")
    return cur


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> Path:
    from tasks.tokenizer import train_tokenizer

    out = workdir() / "data" / "07_tokenizer"
    train_tokenizer(smoke_cfg().tokenizer, curated(), out)
    return out


@functools.lru_cache(maxsize=None)
def pretrained() -> tuple[Path, dict]:
    from tasks.pretrain import pretrain

    out = workdir() / "models" / "pretrain"
    return out, pretrain(smoke_cfg(), tokenizer_dir(), curated(), out)


@functools.lru_cache(maxsize=None)
def sft_model() -> tuple[Path, dict]:
    from tasks.sft import sft

    out = workdir() / "models" / "sft"
    return out, sft(smoke_cfg(), pretrained()[0], curated(), out)


@functools.lru_cache(maxsize=None)
def plain_sft_model() -> tuple[Path, dict]:
    """SFT without corpus replay (sft.replay_ratio=0): the forgetting baseline, and the RLHF parent."""
    from tasks.sft import sft

    out = workdir() / "models" / "sft_plain"
    return out, sft(smoke_cfg("sft.replay_ratio=0"), pretrained()[0], curated(), out)


@functools.lru_cache(maxsize=None)
def dpo_model() -> tuple[Path, dict]:
    from tasks.preference import preference

    out = workdir() / "models" / "preference"
    return out, preference(smoke_cfg(), sft_model()[0], curated(), out)
