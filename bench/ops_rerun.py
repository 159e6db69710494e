"""Cold vs unchanged re-runs of the smoke profile in a fresh workspace (target: an unchanged re-run <= 5 s).

    .venv/bin/python bench/ops_rerun.py [--profile smoke] [--reruns 3] [--keep]

Prints each run's wall time (process start to exit) as a ratio against the cold run, the flow's own
time from summary.json when the flow ran, and the up-to-date decision (stagewise/rerun.py): the first
re-run after a cold run runs the flow (the cold run trained and moved the champion, so it left no
record) and reuses everything; every later unchanged re-run is answered before Prefect or torch are
imported. Then the import-time breakdown of one such answer (`python -X importtime`, top-level
modules), and the machine: CPU model, cores, load average.
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


def run(ws: Path, profile: str, flags: tuple[str, ...] = ()) -> tuple[float, dict, subprocess.CompletedProcess]:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), PATH=f"{BIN}:{os.environ['PATH']}")
    t0 = time.time()
    proc = subprocess.run([sys.executable, *flags, "-c", "from stagewise.cli import main; main()", "run",
                           "--profile", profile, "--config", str(ws / "params.yaml")],
                          cwd=ws, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr[-4000:]}")
    return wall, json.loads((ws / "reports" / "latest" / "summary.json").read_text()), proc


def decision(proc: subprocess.CompletedProcess) -> str:
    for line in proc.stderr.splitlines():
        if "up to date: nothing changed since run" in line:
            return "up to date (flow not run)"
        if "running the pipeline:" in line:
            return "flow ran: " + line.split("running the pipeline:", 1)[1].strip()
    return "?"


def import_breakdown(stderr: str, top: int = 8) -> str:
    """Top-level modules by cumulative import time (`-X importtime` lines, nesting = indentation)."""
    rows = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and not line.startswith("import time: self"):
            _, cumulative, name = (p.strip() for p in line[len("import time:"):].split("|"))
            if not line.rsplit("|", 1)[1].startswith("  "):   # not nested under another import
                rows.append((int(cumulative), name))
    total = sum(c for c, _ in rows)
    best = sorted(rows, reverse=True)[:top]
    return f"{total / 1e6:.2f} s in all: " + ", ".join(f"{n} {c / 1e6:.2f} s" for c, n in best)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                  text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} cores, load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--keep", action="store_true", help="keep the temp workspace")
    ap.add_argument("--reruns", type=int, default=3, help="unchanged re-runs after the cold one")
    args = ap.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="stagewise-bench-")) / "ws"
    ws.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, ws / name)
    shutil.copytree(ROOT / "evals", ws / "evals")
    print(f"machine: {machine()}", flush=True)
    cold_wall, cold, _ = run(ws, args.profile)
    print(f"cold run        : wall {cold_wall:7.1f} s   flow {cold['seconds']:7.1f} s", flush=True)
    fast = []
    for i in range(args.reruns):
        wall, warm, proc = run(ws, args.profile)
        why = decision(proc)
        cached = (all(r["cached"] for r in warm["stages"]) and not warm["data"]["ran"]
                  and (warm.get("compression") or {}).get("cached", True))
        flow = "-" if why.startswith("up to date") else f"{warm['seconds']:.1f} s"
        print(f"unchanged run {i + 1}: wall {wall:7.1f} s = {wall / cold_wall:.3f} x cold   flow {flow:>8}   "
              f"every step cached: {cached}   {why}", flush=True)
        if why.startswith("up to date"):
            fast.append(wall)
    if fast:
        med = statistics.median(fast)
        print(f"median up-to-date re-run (wall): {med:.2f} s = {med / cold_wall:.4f} x cold ({cold_wall / med:.0f}x "
              f"faster); target <= 5 s: {'met' if med <= 5 else 'NOT met'}")
        _, _, proc = run(ws, args.profile, ("-X", "importtime"))
        print(f"imports of an up-to-date re-run: {import_breakdown(proc.stderr)}")
    else:
        print("no re-run was answered as up to date: target NOT met")
    print(f"machine after: {machine()}")
    if not args.keep:
        shutil.rmtree(ws.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
