"""What the reasoning stage's warm start does to general text, per choice (issue 21, item 3): the same parent,
the same reference answers, fine-tuned four ways — full fine-tuning or LoRA (`sft.peft`), without or with
replayed corpus documents (`sft.replay_ratio`) — and for each the probe's sampled solve rate and the held-out
general-text word perplexity before and after, measured by `tasks/reasoning.py:warm_start` itself.

    .venv/bin/python bench/warm_start.py --config params.resolved.yaml --parent models/preference

Run in a finished workspace of the profile you care about (its params.resolved.yaml, its curated data).
Prints one row per variant plus the machine; nothing is written outside --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise.config import load_config  # noqa: E402
from stagewise import machine  # noqa: E402
from stagewise.modeling import load_parent, set_threads  # noqa: E402
from tasks.reasoning import warm_start  # noqa: E402

VARIANTS = {"full-no-replay": ("none", 0.0), "full-replay": ("none", None), "lora-no-replay": ("lora", 0.0),
            "lora-replay": ("lora", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="params.resolved.yaml", help="the resolved params of a run")
    ap.add_argument("--parent", default="models/preference")
    ap.add_argument("--curated", default="data/05_curated")
    ap.add_argument("--work", default="models/bench_warm_start")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    a = ap.parse_args()
    cfg = load_config(Path(a.config))
    set_threads(cfg)
    replay = cfg.sft.replay_ratio or 0.5   # the configured share, or SmolLM2's profile value when it is off
    rows = []
    for name in a.variants.split(","):
        peft, ratio = VARIANTS[name.strip()]
        c = cfg.model_copy(deep=True)
        c.sft.peft = peft
        c.sft.replay_ratio = replay if ratio is None else ratio
        c.reasoning.warm_start_below = 1.0          # always run it: the comparison is the point
        c.reasoning.warm_start_max_ppl_rise_pct = float("inf")   # report the rise, never undo
        model, tok = load_parent(c, Path(a.parent))
        t0 = time.perf_counter()
        _, _, rep = warm_start(c, Path(a.parent), Path(a.curated), Path(a.work) / "out", model, tok)
        rows.append({"variant": name.strip(), "peft": peft, "replay_ratio": c.sft.replay_ratio,
                     "solve_rate": f"{rep['solve_rate_before']:.3f} -> {rep['solve_rate_after']:.3f}",
                     "general_ppl_rise_pct": rep.get("general_ppl_rise_pct"), "steps": rep["sft_steps"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(a.work, ignore_errors=True)
    print(json.dumps({"machine": machine.label(machine.describe()), "threads": cfg.run.threads}))


if __name__ == "__main__":
    main()
