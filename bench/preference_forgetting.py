"""What DPO does to general text, per choice (issue 21, item 3: "the same for DPO"): the same parent, the
same pairs, trained four ways — full fine-tuning or LoRA (`preference.peft`), without or with the replay
term (`preference.replay_coef`: next-token loss on the parent's SFT chats and corpus blocks every step) — and
for each the held-out chosen-vs-rejected margin (the stage's target, nats) and the held-out general-text word
perplexity before and after, measured the way the stage and the warm start measure them.

    .venv/bin/python bench/preference_forgetting.py --config params.resolved.yaml --parent models/sft

Run in a finished workspace of the profile you care about (its params.resolved.yaml, its curated data).
`--learning-rate` overrides the profile's DPO learning rate for every variant (a stress test: the
forgetting a larger step buys). Prints one row per variant plus the machine; nothing is written outside --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise import machine  # noqa: E402
from stagewise.config import load_config  # noqa: E402
from stagewise.modeling import heldout_texts, load_parent, mean_nll, set_threads, word_ppl_rise_pct  # noqa: E402
from tasks.preference import dpo  # noqa: E402

VARIANTS = {"full": ("none", 0.0), "full-replay": ("none", None), "lora": ("lora", 0.0), "lora-replay": ("lora", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="params.resolved.yaml", help="the resolved params of a run")
    ap.add_argument("--parent", default="models/sft")
    ap.add_argument("--curated", default="data/05_curated")
    ap.add_argument("--work", default="models/bench_preference")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--replay-coef", type=float, default=None, help="γ of the replay variants (default: the "
                    "configured preference.replay_coef, or 1.0 when it is off)")
    ap.add_argument("--learning-rate", type=float, default=None)
    a = ap.parse_args()
    cfg = load_config(Path(a.config))
    set_threads(cfg)
    coef = a.replay_coef or cfg.preference.replay_coef or 1.0
    model, tok = load_parent(cfg, Path(a.parent))
    texts = heldout_texts(Path(a.curated), cfg.sft.eval_limit or None)
    nll_before = mean_nll(model, tok, texts)
    del model
    rows = []
    for name in a.variants.split(","):
        peft, c_ = VARIANTS[name.strip()]
        c = cfg.model_copy(deep=True)
        c.preference.peft = peft
        c.preference.replay_coef = coef if c_ is None else c_
        if a.learning_rate:
            c.preference.learning_rate = a.learning_rate
        out = Path(a.work) / name.strip()
        t0 = time.perf_counter()
        res = dpo(c, Path(a.parent), Path(a.curated), out)
        wall = time.perf_counter() - t0
        after_model, _ = load_parent(c, out)
        rise = word_ppl_rise_pct(nll_before, mean_nll(after_model, tok, texts), tok, texts)
        rows.append({"variant": name.strip(), "peft": peft, "replay_coef": c.preference.replay_coef,
                     "learning_rate": c.preference.learning_rate, "steps": res.get("steps"),
                     "margin": f"{res['before']['margin']:.3f} -> {res['after']['margin']:.3f}",
                     "accuracy": f"{res['before']['accuracy']:.3f} -> {res['after']['accuracy']:.3f}",
                     "general_ppl_rise_pct": round(rise, 2), "general_texts": len(texts),
                     "replay_loss": [round(res[k], 3) for k in ("replay_loss_first", "replay_loss_last") if k in res],
                     "seconds": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(a.work, ignore_errors=True)
    print(json.dumps({"machine": machine.label(machine.describe()), "threads": cfg.run.threads}))


if __name__ == "__main__":
    main()
