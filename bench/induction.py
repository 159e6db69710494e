"""When does the demo model copy from its context (issues 24, 25)? Probes of a model on the held-out rag set.

Reading a document (RAFT) and filling a tool call's argument from the question both need a model that
repeats an unseen span of its context (induction). Each item shows the sw_rag prompt's five documents (the
oracle among 4 distractors, the eval set's own draw: stagewise.rag.eval_item), then one of:

  copy    the oracle sentence's first word (a held-out person's name) → the rest of the sentence, verbatim
  recall  the oracle sentence up to the answer ("Juzan lives in") → the answer
  lookup  the question and the answer's first word ("Where does Juzan live? In") → the answer

greedy, scored on the text up to the first period. Plain text, no chat template: it measures the
pretrained model (and what SFT keeps of it). Also `name_nll_first` / `name_nll_later`: the mean loss of a
name's tokens after its first, at its first mention and at its later ones, in 60 fresh copy documents
(tasks/generate.py:copy_documents, another seed): a model that copies predicts the later ones.

    .venv/bin/python bench/induction.py probe models/pretrain models/sft          # in a demo workspace
    .venv/bin/python bench/induction.py pretrain --out /tmp/x/model --set pretrain.max_steps=1200

`pretrain` trains the workspace's pretraining stage (tasks/pretrain.py, on its data/05_curated and
data/07_tokenizer) into --out with the `--set` overrides, then probes it; it prints its wall time.

`synthetic` asks the architecture itself, without the corpus in the way: the model `model.*` describes,
from random init, trained (AdamW, constant lr, clip 1.0) on spans of 8-32 random tokens repeated until the
block is full; every 100 steps, greedy accuracy on the 2nd-16th tokens of a 16-token span's second
occurrence after a random gap. Induction heads show as a sudden rise (the "phase change"). The period
varies, so a fixed-offset attention head (what a span repeated at a fixed period is solved by) does not
pass. `--corpus-share` mixes that share of the workspace's packed corpus blocks into the batches.

    .venv/bin/python bench/induction.py synthetic --steps 2500 --set model.num_layers=2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise import logs, machine  # noqa: E402
from stagewise.rag import eval_item, eval_pool  # noqa: E402


def items(rag_path: Path, n: int, chunk_chars: int = 512) -> list[dict]:
    rows = [json.loads(line) for line in rag_path.read_text().splitlines() if line.strip()]
    pool = eval_pool(rows, chunk_chars)
    out = []
    for i, r in enumerate(rows[:n]):
        it = eval_item(r, pool, i, True, 4, chunk_chars, 0)
        oracle = r["documents"][r["oracle"]]
        name = oracle.split(" ")[0]
        # one line: a name after a space is the documents' own tokens (" Juzan"; "Juzan" at a line start is others)
        ctx = " ".join(it["shown"]) + " "
        cut = oracle.index(r["answer"])
        lead = "In" if "live" in r["question"] else "A"
        out.append({"copy": (ctx + name, oracle[len(name):].rstrip(".")),
                    "recall": (ctx + oracle[:cut].rstrip(), " " + r["answer"]),
                    "lookup": (ctx + r["question"] + " " + lead, " " + r["answer"])})
    return out


def probe(model_dir: Path, probes: list[dict], threads: int = 1) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hits = {k: 0 for k in probes[0]}
    examples = {}
    for it in probes:
        for kind, (prompt, want) in it.items():
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
            got = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True).split(".")[0]
            hits[kind] += got.strip() == want.strip()
            examples.setdefault(kind, (want, got))
    first, later = name_nll(model, tok)
    return {"model": str(model_dir), "items": len(probes), **{k: round(v / len(probes), 3) for k, v in hits.items()},
            "name_nll_first": round(first, 2), "name_nll_later": round(later, 2),
            "example": {k: f"{w!r} -> {g!r}" for k, (w, g) in examples.items()}}


def name_nll(model, tok) -> tuple[float, float]:
    import re

    import torch

    from stagewise.config import GenerateConfig
    from tasks.generate import copy_documents

    first, later = [], []
    for d in (r["text"] for r in copy_documents(GenerateConfig(seed=99, n_copy_docs=60))):
        enc = tok(d, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"]).logits[0]
        nll = -torch.log_softmax(logits[:-1], -1).gather(1, enc["input_ids"][0, 1:, None])[:, 0]
        offs = enc["offset_mapping"][0].tolist()
        for name in set(re.findall(r"\b([A-Z][a-z]+[nkrl])\b", d)) - {"Ben", "Tom", "Sam", "Hugo", "Paul"}:
            for j, m in enumerate(re.finditer(rf"\b{name}\b", d)):
                s, e = m.span()
                (first if j == 0 else later).extend(nll[t - 1].item() for t, (a, b) in enumerate(offs) if s < a and b <= e)
    return sum(first) / len(first), sum(later) / len(later)


def synthetic(cfg, steps: int, lr: float, corpus_share: float, curated: Path, tokenizer: Path) -> list[dict]:
    """The copy-accuracy curve of cfg.model's architecture trained on repeated random spans."""
    import random

    import torch

    from stagewise.modeling import build_model, load_tokenizer, pack, read_jsonl

    torch.set_num_threads(cfg.run.threads)
    tok = load_tokenizer(tokenizer)
    model = build_model(cfg.model, tok, seed=cfg.run.seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    T, B = cfg.pretrain.seq_len, cfg.pretrain.batch_size
    rng = random.Random(cfg.run.seed)
    corpus = pack(tok, [r["text"] for r in read_jsonl(curated / "corpus.jsonl", ["text"])], T) if corpus_share else []

    def repeated() -> list[int]:
        span, ids = rng.choices(vocab, k=rng.randint(8, 32)), []
        while len(ids) < T:
            ids += span
        return ids[:T]

    g = random.Random(99)   # the probe: the same 32 sequences at every evaluation
    probe_x, probe_mask = [], []
    for _ in range(32):
        span = g.choices(vocab, k=16)
        ids = g.choices(vocab, k=g.randint(0, 20)) + span + g.choices(vocab, k=g.randint(0, 40)) + span
        probe_mask.append([0] * (len(ids) - 16) + [1] * 16 + [0] * (T - len(ids)))
        probe_x.append(ids + [vocab[0]] * (T - len(ids)))
    probe_x, in_span = torch.tensor(probe_x), torch.tensor(probe_mask).bool()
    mask = in_span[:, 1:] & in_span[:, :-1]   # targets whose previous token is in the span too: its 2nd..16th

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    curve, t0 = [], time.perf_counter()
    for step in range(steps + 1):
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                pred = model(input_ids=probe_x).logits[:, :-1].argmax(-1)
            acc = (pred[mask] == probe_x[:, 1:][mask]).float().mean().item()
            curve.append({"step": step, "copy_acc": round(acc, 3), "s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
            model.train()
        if step == steps:
            break
        x = torch.tensor([rng.choice(corpus) if corpus and rng.random() < corpus_share else repeated() for _ in range(B)])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("models", nargs="+", type=Path)
    t = sub.add_parser("pretrain")
    t.add_argument("--out", required=True, type=Path)
    y = sub.add_parser("synthetic")
    y.add_argument("--steps", type=int, default=2500)
    y.add_argument("--lr", type=float, default=1e-3)
    y.add_argument("--corpus-share", type=float, default=0.0)
    for q in (t, y):   # the two that train: the workspace's config, with overrides
        q.add_argument("--config", default="params.resolved.yaml")
        q.add_argument("--set", action="append", default=[], dest="sets")
    for q in (p, t):
        q.add_argument("--rag", type=Path, default=Path("data/01_raw/benchmarks/rag.jsonl"))
        q.add_argument("--n", type=int, default=100, help="held-out rag items probed")
    a = ap.parse_args()
    if a.cmd == "probe":
        probes = items(a.rag, a.n)
        for m in a.models:
            print(json.dumps(probe(m, probes)), flush=True)
        return
    from stagewise.config import load_config
    from stagewise.workspace import Workspace

    ws = Workspace.at(".")
    cfg = load_config(Path(a.config), None, a.sets, root=ws.root)
    m = cfg.model
    about = {"shape": f"{m.num_layers}x{m.hidden_size} h{m.num_heads}/{m.num_kv_heads}", "sets": a.sets,
             "machine": machine.label(machine.describe())}
    if a.cmd == "synthetic":
        curve = synthetic(cfg, a.steps, a.lr, a.corpus_share, ws.curated, ws.tokenizer)
        formed = next((c["step"] for c in curve if c["copy_acc"] >= 0.5), None)
        print(json.dumps({**about, "lr": a.lr, "corpus_share": a.corpus_share, "steps": a.steps,
                          "copy_acc_ge_0.5_at": formed, "final_copy_acc": curve[-1]["copy_acc"]}), flush=True)
        return
    from tasks.pretrain import pretrain

    probes = items(a.rag, a.n)
    logs.configure()
    t0 = time.perf_counter()
    res = pretrain(cfg, ws.tokenizer, ws.curated, a.out)
    wall = time.perf_counter() - t0
    print(json.dumps({**probe(a.out, probes, cfg.run.threads), **about, "pretrain_s": round(wall, 1),
                      "steps": cfg.pretrain.max_steps, "params": res.get("params"),
                      "eval_loss": res.get("train_metrics", {}).get("eval_loss"),
                      "heldout_ppl": res.get("heldout_ppl")}), flush=True)

if __name__ == "__main__":
    main()
