"""Cold vs unchanged re-run of the smoke profile in a fresh workspace (target: re-run <= 30 s, all cached).

    .venv/bin/python bench/ops_rerun.py [--profile smoke] [--keep]

Prints each run's wall time (process start to exit: imports, Prefect's temporary server, the flow)
and the flow's own time from summary.json, the ratio, and whether every step was reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    args = ap.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="stagewise-bench-")) / "ws"
    ws.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, ws / name)
    shutil.copytree(ROOT / "evals", ws / "evals")
    cold_wall, cold = run(ws, args.profile)
    warm_wall, warm = run(ws, args.profile)
    all_cached = all(r["cached"] for r in warm["stages"]) and len(warm["data"]["cached"]) >= 6
    print(f"cold run      : wall {cold_wall:7.1f} s   flow {cold['seconds']:7.1f} s")
    print(f"unchanged run : wall {warm_wall:7.1f} s   flow {warm['seconds']:7.1f} s   "
          f"(every step cached: {all_cached})")
    print(f"ratio cold/unchanged (wall): {cold_wall / warm_wall:.1f}x;  target unchanged <= 30 s: "
          f"{'met' if warm_wall <= 30 else 'NOT met'}")
    for r in warm["stages"]:
        print(f"  {r['name']:<12} cached={r['cached']}  {r.get('seconds')} s")
    if not args.keep:
        shutil.rmtree(ws.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
