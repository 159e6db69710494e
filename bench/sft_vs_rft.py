"""SFT vs RFT: the same parent tuned on the same verifiable problems, by SFT on reference solutions
("The answer is N.") and by GRPO (tasks/reasoning.py), evaluated side by side on seen-template and
unseen-template arithmetic (docs/training.md "SFT vs RFT"). An experiment that runs two steps'
recipes, so it lives here and not in either step.

    .venv/bin/python bench/sft_vs_rft.py --parent models/preference --rft models/reasoning
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise.config import Config  # noqa: E402
from stagewise.modeling import benchmarks_dir, load_parent, set_threads  # noqa: E402
from tasks.reasoning import arithmetic_eval, load_problems  # noqa: E402
from tasks.sft import sft  # noqa: E402


def sft_on_solutions(cfg: Config, parent_dir: Path, curated_dir: Path, out_dir: Path) -> dict:
    """The baseline: SFT of the same parent on the same problems with reference solutions."""
    sol = Path(out_dir).parent / f"{Path(out_dir).name}.data"
    sol.mkdir(parents=True, exist_ok=True)
    with (sol / "chat.jsonl").open("w") as f:
        import json

        for i, p in enumerate(load_problems(curated_dir)):
            msgs = p["prompt"] + [{"role": "assistant", "content": f"The answer is {p['answer']}."}]
            f.write(json.dumps({"id": f"sol-{i}", "messages": msgs}) + "\n")
    b = benchmarks_dir(curated_dir)
    if b is not None and not (sol / "benchmarks").exists():
        (sol / "benchmarks").symlink_to(b)
    cfg = cfg.model_copy(deep=True)
    cfg.sft.peft = "none"
    cfg.sft.epochs = cfg.reasoning.sft_epochs
    cfg.sft.max_steps = -1
    cfg.sft.learning_rate = cfg.reasoning.sft_learning_rate
    cfg.sft.eval_limit = 1   # the comparison below evaluates both sides the same way
    cfg.sft.replay_ratio = 0.0   # the same problems as GRPO sees, nothing else
    res = sft(cfg, parent_dir, sol, out_dir)
    shutil.rmtree(sol, ignore_errors=True)
    return res


def sft_vs_rft(cfg: Config, parent_dir: Path, curated_dir: Path, rft_dir: Path, work_dir: Path) -> list[dict]:
    """Held-out pass@1 on seen-template and unseen-template arithmetic: parent, SFT baseline, RFT (GRPO)."""
    set_threads(cfg)
    sft_dir = Path(work_dir) / "sft_baseline"
    t0 = time.perf_counter()
    sft_on_solutions(cfg, parent_dir, curated_dir, sft_dir)
    sft_wall = time.perf_counter() - t0
    rows = []
    for name, d in (("parent", parent_dir), ("sft_on_solutions", sft_dir), ("rft_grpo", rft_dir)):
        model, tok = load_parent(cfg, d)
        m = arithmetic_eval(model, tok, curated_dir, cfg)
        rows.append({"method": name, **{k: round(v, 3) for k, v in m.items()},
                     **({"train_wall_s": round(sft_wall, 1)} if name == "sft_on_solutions" else {})})
    return rows


def main() -> None:
    from stagewise.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="params.resolved.yaml", help="the resolved params of a run")
    ap.add_argument("--parent", default="models/preference")
    ap.add_argument("--rft", default="models/reasoning")
    ap.add_argument("--curated", default="data/05_curated")
    ap.add_argument("--work", default="models/sft_vs_rft")
    a = ap.parse_args()
    rows = sft_vs_rft(load_config(Path(a.config)), Path(a.parent), Path(a.curated), Path(a.rft), Path(a.work))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
