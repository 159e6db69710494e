"""Does the raft step teach the model to read (issue 25)? The same parent fine-tuned twice by the SFT stage
itself (tasks/sft.py), once with the raft step's open-book chats and once without (`raft.enabled: false`),
both scored on every rag set (the oracle among 4 distractors, and `_no_oracle`) by the project's
evaluation; the difference in token F1 gets the rulebook's paired bootstrap CI (stagewise/rulebook.py).

    .venv/bin/python bench/raft.py --config params.resolved.yaml --parent models/pretrain       # demo
    .venv/bin/python bench/raft.py --config params.resolved.yaml --parent models/base --limit 0  # smollm2

Run in a workspace that went through the data steps and the parent's stage (its params.resolved.yaml,
data/05_curated, data/01_raw/benchmarks). Each variant reads the curated data through a folder of its own
under --work (data/05_curated linked, data/05_raft written by tasks/raft.py with the variant's setting),
so nothing of the workspace is changed; a variant whose model is already there is only scored again
(`--retrain` to train anew). `--set` overrides both variants (e.g. `--set sft.max_length=256`).
Prints one JSON row per variant, then the CI row and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise import logs, machine  # noqa: E402
from stagewise.config import load_config  # noqa: E402
from stagewise.evalsets import NO_ORACLE, plan  # noqa: E402
from stagewise.evaluation import evaluate  # noqa: E402
from stagewise.rulebook import bootstrap_delta_ci  # noqa: E402
from stagewise.stage import eval_tasks_dir  # noqa: E402
from stagewise.workspace import Workspace  # noqa: E402
from tasks.raft import raft  # noqa: E402
from tasks.sft import sft  # noqa: E402

VARIANTS = {"raft": True, "no-raft": False}


def shadow(ws: Workspace, root: Path) -> Path:
    """A workspace folder whose data/ shows the real curated data and benchmarks, with its own 05_raft."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for d in (ws.raw, ws.curated):
        link = data / d.name
        if not link.exists():
            os.symlink(d, link, target_is_directory=True)
    return data / ws.curated.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="params.resolved.yaml", help="the resolved params of a run")
    ap.add_argument("--parent", default="models/pretrain", help="the SFT parent (models/base on a foreign base)")
    ap.add_argument("--work", default="models/bench_raft")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], dest="sets", help="override for both, e.g. sft.epochs=8")
    ap.add_argument("--limit", type=int, default=None,
                    help="items per rag task (default evaluate.limit; 0: every item of the set)")
    ap.add_argument("--retrain", action="store_true", help="train a variant even if its model is there")
    a = ap.parse_args()
    logs.configure()   # the stages' progress lines (step, loss) on stderr
    ws = Workspace.at(".")
    cfg = load_config(Path(a.config), None, a.sets, root=ws.root)
    ev = cfg.evaluate.model_copy(update={"limit": cfg.evaluate.limit if a.limit is None else (a.limit or None)})
    p = plan(cfg, ws.root)
    rag_sets = [n for n, s in p.sets.items() if s["kind"] == "rag"]
    if not rag_sets:
        sys.exit(f"error: {a.config}: no rag evaluation set (generate.n_rag: 0, or none declared under evaluate.sets)")
    tasks = [t for n in rag_sets for t in (n, f"{n}{NO_ORACLE}")]
    results, rows = {}, []
    for name in a.variants.split(","):
        name = name.strip()
        c = cfg.model_copy(deep=True)
        c.raft.enabled = VARIANTS[name]
        root = (Path(a.work) / name).resolve()
        model_dir = root / "model"
        info = {}
        if a.retrain or not (model_dir / "model.safetensors").exists():
            curated = shadow(ws, root)
            stats = raft(c.raft, curated, root / "data" / "05_raft", root)
            t0 = time.perf_counter()
            out = sft(c, Path(a.parent), curated, model_dir)
            info = {"raft_rows": stats.get("rows", 0), "sft_steps": out.get("steps"),
                    "sft_seconds": round(time.perf_counter() - t0, 1), "n_train": out.get("n_train"),
                    "n_replay": out.get("n_replay")}
        res = evaluate(model_dir, tasks, ws, ev, tasks_dir=eval_tasks_dir(cfg, ws.root))
        results[name] = res
        row = {"variant": name, **info}
        for n in rag_sets:
            r, r0 = res[n], res[f"{n}{NO_ORACLE}"]
            row |= {f"{n}.token_f1": round(r["token_f1"], 4), f"{n}.exact_match": round(r["exact_match"], 4),
                    f"{n}.quote_valid": round(r["quote_valid"], 4), f"{n}{NO_ORACLE}.token_f1": round(r0["token_f1"], 4),
                    f"{n}.items": r["n"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if {"raft", "no-raft"} <= results.keys():
        for n in rag_sets:
            for t in (n, f"{n}{NO_ORACLE}"):
                lo, hi, paired = bootstrap_delta_ci("token_f1", "points", results["raft"][t], results["no-raft"][t],
                                                    cfg.evaluate.bootstrap_iters, cfg.gate.confidence)
                d = 100.0 * (results["raft"][t]["token_f1"] - results["no-raft"][t]["token_f1"])
                print(json.dumps({"compare": f"{t}.token_f1 raft - no-raft", "delta_points": round(d, 2),
                                  "ci": [round(lo, 2), round(hi, 2)], "confidence": cfg.gate.confidence,
                                  "paired": paired, "items": results["raft"][t]["n"],
                                  "above_zero": lo > 0}), flush=True)
    print(json.dumps({"machine": machine.label(machine.describe()), "threads": cfg.run.threads}))


if __name__ == "__main__":
    main()
