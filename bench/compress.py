"""Compression size/latency: every method vs its parent, measured in one process.

    .venv/bin/python bench/compress.py                         # a demo-size Llama (random weights)
    .venv/bin/python bench/compress.py --model models/reasoning  # a trained parent folder
    .venv/bin/python bench/compress.py --hidden 256 --layers 6 --intermediate 768   # a bigger shape

Sizes and speed do not depend on what the weights learned, so the default parent is a randomly
initialised Llama of the demo shape (params.yaml `model:`); quality is the pipeline's job (compress
step + gate). Speed is greedy generation, timed interleaved across all models (best of N rounds), at
batch 1 (latency) and batch 16 (throughput), single thread (see measure.tokens_per_s), so the ratios
are fair on a shared machine. Chains (`distill_student+nf4`, ...) quantize the previous link's folder,
as the compress step does; the last line is what compress.select's defaults would ship on size and
speed alone (never slower than the parent), with its tokens/s ratio. Targets (issue 5): NF4 weights >= 3.5x smaller than fp32; structured
pruning removes >= 30% of params and is faster at generation; the distilled student <= half the
teacher's params.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def build_parent(args, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def main() -> None:
    from stagewise.config import ModelConfig
    from stagewise.compression import distill, prune, quantize
    from stagewise.compression.measure import load_candidate, measure, quiet_bnb_warnings, sparsity, tokens_per_s
    from stagewise.modeling import load_model

    d = ModelConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a parent HF folder (default: random demo-size Llama)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=d.hidden_size)
    ap.add_argument("--intermediate", type=int, default=d.intermediate_size)
    ap.add_argument("--layers", type=int, default=d.num_layers)
    ap.add_argument("--heads", type=int, default=d.num_heads)
    ap.add_argument("--kv-heads", type=int, default=d.num_kv_heads)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (best counts)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    quiet_bnb_warnings()

    tmp = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    parent_dir = args.model or build_parent(args, tmp / "parent")
    parent = load_model(parent_dir).eval()
    vocab = parent.config.vocab_size
    calib = torch.randint(8, vocab, (16, 128), generator=torch.Generator().manual_seed(0))

    models, dirs = {"parent": parent}, {"parent": parent_dir}
    models["nf4"] = quantize.quantize_bnb(parent_dir, tmp / "nf4", "nf4")[0] if _save_tok(parent_dir) else None
    models["int8"] = quantize.quantize_bnb(parent_dir, tmp / "int8", "int8")[0]
    dirs |= {"nf4": tmp / "nf4", "int8": tmp / "int8"}
    models["dynamic_int8"] = quantize.quantize_dynamic_int8(parent_dir, tmp / "dynamic_int8")
    dirs["dynamic_int8"] = tmp / "dynamic_int8"
    models["prune_magnitude"] = prune.make_permanent(prune.magnitude_prune(load_model(parent_dir), 0.5))
    models["prune_2of4"] = prune.make_permanent(prune.two_four_prune(load_model(parent_dir)))
    models["prune_structured"] = prune.structured_prune(load_model(parent_dir), calib, 0.5, 0.5)
    models["distill_student"] = distill.make_student(parent, calib, 0.5, 0.75, 0.5, "prune")
    for name in ("prune_magnitude", "prune_2of4", "prune_structured", "distill_student"):
        models[name].save_pretrained(tmp / name)
        _save_tok(tmp / name, like=parent_dir)
        dirs[name] = tmp / name
    # chains: each link from the previous link's folder, as the compress step builds them
    for first, quant in (("distill_student", "nf4"), ("prune_structured", "nf4"), ("distill_student", "int8")):
        name = f"{first}+{quant}"
        models[name] = quantize.quantize_bnb(dirs[first], tmp / name, quant)[0]
        dirs[name] = tmp / name
    # every candidate as it reloads from its folder (what the pipeline ships)
    models = {n: (m if n == "parent" else load_candidate(dirs[n])) for n, m in models.items()}

    sizes = {n: measure(m, dirs[n]) for n, m in models.items()}
    lat = tokens_per_s(models, args.tokens, args.repeats, batch_size=1)
    thr = tokens_per_s(models, args.tokens, max(2, args.repeats // 2), batch_size=16)
    p = sizes["parent"]
    rows = []
    print(f"parent: {parent_dir}  ({p['params']:,} params; {args.tokens} new tokens, best of {args.repeats} "
          f"interleaved rounds, 1 thread)\n")
    print(f"{'method':<24}{'params':>10}{'x params':>10}{'x disk':>9}{'x memory':>10}"
          f"{'tok/s b1':>10}{'speed b1':>10}{'tok/s b16':>11}{'speed b16':>11}{'sparsity':>10}")
    for n, s in sizes.items():
        r = {"method": n, **s, "params_ratio": p["params"] / s["params"], "disk_ratio": p["bytes"] / max(s["bytes"], 1),
             "memory_ratio": p["memory_bytes"] / s["memory_bytes"], "tokens_per_s_b1": lat[n],
             "speedup_b1": lat[n] / lat["parent"], "tokens_per_s_b16": thr[n], "speedup_b16": thr[n] / thr["parent"],
             "sparsity": sparsity(models[n]) if n.startswith("prune") else None}
        rows.append(r)
        sp = f"{r['sparsity']:.2f}" if r["sparsity"] is not None else "—"
        print(f"{n:<24}{s['params']:>10,}{r['params_ratio']:>9.2f}x{r['disk_ratio']:>8.2f}x{r['memory_ratio']:>9.2f}x"
              f"{lat[n]:>10.1f}{r['speedup_b1']:>9.2f}x{thr[n]:>11.1f}{r['speedup_b16']:>10.2f}x{sp:>10}")
    removed = 1 - sizes["prune_structured"]["params"] / p["params"]
    print(f"\nNF4 memory {p['memory_bytes'] / sizes['nf4']['memory_bytes']:.2f}x smaller (target >= 3.5x); "
          f"structured pruning removes {removed:.0%} of params (target >= 30%), generation "
          f"{lat['prune_structured'] / lat['parent']:.2f}x (b1) / {thr['prune_structured'] / thr['parent']:.2f}x (b16); "
          f"student {sizes['distill_student']['params'] / p['params']:.2f} of the teacher's params (target <= 0.5)")
    chosen = _choose(sizes, lat, thr, dirs)
    if chosen:
        print(f"chosen by compress.select's defaults (size and speed only: random weights, accuracy is the "
              f"pipeline's): {chosen} — {lat[chosen] / lat['parent']:.2f}x the parent's tokens/s at batch 1, "
              f"{p['memory_bytes'] / sizes[chosen]['memory_bytes']:.2f}x smaller in memory")
    else:
        print("chosen by compress.select's defaults: none (every candidate slower than the parent)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _choose(sizes: dict, lat: dict, thr: dict, dirs: dict) -> str | None:
    """The default policy on this bench's numbers; every accuracy check counted as passed."""
    from stagewise.compression.measure import RECIPE
    from stagewise.compression.select import select
    from stagewise.config import Config

    def row(n):
        return {"method": n, **sizes[n], "tokens_per_s": lat[n], "tokens_per_s_batched": thr[n],
                "check": {"passed": True, "failed": []}, "reloadable": not (Path(dirs[n]) / RECIPE).exists(),
                "reload_error": "recipe folder", "metrics": {}}

    return select(Config(), row("parent"), [row(n) for n in sizes if n != "parent"])["chosen"]


def _save_tok(parent_dir: Path, like: Path | None = None) -> bool:
    """quantize_bnb saves the parent's tokenizer; a random bench parent gets a byte-level stand-in."""
    if any(Path(parent_dir).glob("tokenizer*")):
        return True
    if like is not None:
        from stagewise.modeling import load_tokenizer

        load_tokenizer(like).save_pretrained(parent_dir)
        return True
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stagewise.modeling import BOS, CHAT_TEMPLATE, EOS, PAD

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate([PAD, BOS, EOS] + sorted(alphabet))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(parent_dir)
    return True


if __name__ == "__main__":
    main()
