"""Cold vs unchanged re-run of the smoke profile in a fresh workspace (target: re-run <= 30 s, all cached).

    .venv/bin/python bench/ops_rerun.py [--profile smoke] [--reruns 3] [--keep]

Prints each run's wall time (process start to exit: imports, Prefect's temporary server, the flow)
and the flow's own time from summary.json, the median of the unchanged re-runs, the ratio, and
whether every step was reused each time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(ws: Path, profile: str) -> tuple[float, dict]:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), PATH=f"{BIN}:{os.environ['PATH']}")
    t0 = time.time()
    proc = subprocess.run([str(BIN / "stagewise"), "run", "--profile", profile, "--config", str(ws / "params.yaml")],
                          cwd=ws, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr[-4000:]}")
    return wall, json.loads((ws / "reports" / "latest" / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--keep", action="store_true", help="keep the temp workspace")
    ap.add_argument("--reruns", type=int, default=3, help="unchanged re-runs after the cold one (median reported)")
    args = ap.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="stagewise-bench-")) / "ws"
    ws.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, ws / name)
    shutil.copytree(ROOT / "evals", ws / "evals")
    cold_wall, cold = run(ws, args.profile)
    print(f"cold run        : wall {cold_wall:7.1f} s   flow {cold['seconds']:7.1f} s", flush=True)
    walls, all_cached = [], True
    for i in range(args.reruns):
        wall, warm = run(ws, args.profile)
        cached = (all(r["cached"] for r in warm["stages"]) and len(warm["data"]["cached"]) >= 6
                  and (warm.get("compression") or {}).get("cached", True))
        all_cached &= cached
        walls.append(wall)
        print(f"unchanged run {i + 1}: wall {wall:7.1f} s   flow {warm['seconds']:7.1f} s   "
              f"(every step cached: {cached}: "
              + ", ".join(f"{r['name']}={'cached' if r['cached'] else 'RAN'}" for r in warm["stages"])
              + f", compress={'cached' if (warm.get('compression') or {}).get('cached') else 'RAN/none'})",
              flush=True)
    med = statistics.median(walls)
    print(f"median unchanged (wall): {med:.1f} s;  ratio cold/unchanged: {cold_wall / med:.1f}x;  "
          f"target unchanged <= 30 s with every step cached: {'met' if med <= 30 and all_cached else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(ws.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
