"""The data phase's sharded steps (quality, dedup) on a local Ray of 1 and 2 workers vs the local
engine, on the same curated input, and where Ray's overhead goes.

    .venv/bin/python bench/cluster.py                                  # demo profile's corpus
    .venv/bin/python bench/cluster.py --set generate.n_docs=12000 --tasks 4 --repeats 3

Prepares one workspace (generate + ingest: quality's input), then, in this process:
  local     — quality then dedup with `ops.engine: local` (one process, one shard): the baseline;
  ray × W   — the same two steps with `ops.engine: ray`, `ops.data_tasks: --tasks`, on a Ray this
              process starts with `num_cpus=W` (W = 1, 2: one task per CPU at a time), i.e. W workers.
Every variant writes byte-identical outputs (checked here too). Prints the wall times, each as a
ratio to the local baseline, and the breakdown of a Ray run:
  ray.init            — starting the local Ray (GCS, raylet, the first worker pool): once per cluster;
  first task          — a no-op task's first round trip (a worker process starting and importing);
  task round trip     — a no-op task's round trip once workers are up (median of 20);
  placement group + new actor — what datatrove does per task: a placement group and a fresh
                        RankWorker actor (a new worker process importing datatrove) (median of 3);
  executor, empty     — one datatrove RayPipelineExecutor run of --tasks no-op tasks through
                        stagewise.shards.run_tasks (scheduling, logging folders, completion markers,
                        placement records, the scratch run folder), for each of the phase's 4
                        runs (quality: --tasks; dedup: signatures --tasks, buckets as many band
                        groups, clusters 1 task);
  shard I/O (driver)  — the driver's writes of the tasks' inputs and reads of their outputs (JSON /
                        npz in the scratch folder); the workers read and write about as many bytes;
  steps' work         — the local run (the same functions, one process).
On 2 cores shared with other work, expect no speed-up: the point is that the overhead is known.
The shared machine only ever adds time: each variant's best of --repeats interleaved rounds counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(k, v)


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare(profile: str, sets: list[str], root: Path):
    from stagewise.config import load_config
    from tasks.generate import generate
    from tasks.ingest import ingest

    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "evals", root / "evals")
    cfg = load_config(root / "params.yaml", profile, sets)
    generate(cfg.generate, root / "data" / "01_raw")
    ingest(cfg.data, cfg.ingest, root / "data" / "01_raw", root / "data" / "02_ingested", root=root)
    return cfg


class ShardIO:
    """Seconds and bytes of the driver's shard writes and reads (stagewise.shards._dump / _load)."""

    def __init__(self):
        from stagewise import shards

        self.shards, self.dump, self.load = shards, shards._dump, shards._load
        self.seconds, self.calls = 0.0, 0

    def __enter__(self):
        def timed(f):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                try:
                    return f(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t
                    self.calls += 1
            return wrapper

        self.shards._dump, self.shards._load = timed(self.dump), timed(self.load)
        return self

    def __exit__(self, *exc):
        self.shards._dump, self.shards._load = self.dump, self.load


def phase(cfg, src: Path, out: Path, ops) -> float:
    from tasks.dedup import dedup
    from tasks.quality import quality

    t = time.perf_counter()
    quality(cfg.quality, src, out / "q", ops)
    dedup(cfg.dedup, out / "q", out / "d", ops)
    return time.perf_counter() - t


def noop(x, shared):
    return {"x": x}


def ray_breakdown(ops, sizes: list[int]) -> dict:
    """Fixed costs on the running Ray: no-op task round trips and one empty executor run."""
    import ray

    from stagewise import shards

    @ray.remote(num_cpus=1)
    def ping():
        return 0

    t = time.perf_counter()
    ray.get(ping.remote())
    first = time.perf_counter() - t
    trips = []
    for _ in range(20):
        t = time.perf_counter()
        ray.get(ping.remote())
        trips.append(time.perf_counter() - t)
    # datatrove runs each task as a fresh RankWorker actor in a placement group of its own: an actor
    # is a new worker process, so each task pays a process start (and its imports)
    actor_cls = ray.remote(num_cpus=1)(Pinger)
    actors = []
    for _ in range(3):
        t = time.perf_counter()
        pg = ray.util.placement_group([{"CPU": 1}])
        ray.get(pg.ready())
        actor = actor_cls.options(placement_group=pg).remote()
        ray.get(actor.ping.remote())
        actors.append(time.perf_counter() - t)
        ray.kill(actor)
        ray.util.remove_placement_group(pg)
    empty = {}
    for k in sorted(set(sizes)):
        t = time.perf_counter()
        shards.run_tasks(noop, list(range(k)), ops, shared={"n": k}, step="bench")
        empty[k] = time.perf_counter() - t
    return {"first_task_s": first, "task_round_trip_s": statistics.median(trips),
            "actor_start_s": statistics.median(actors), "executor_empty_s": empty,
            "executor_fixed_s": sum(empty[k] for k in sizes)}


class Pinger:
    def ping(self):
        import datatrove  # noqa: F401 - what a RankWorker process imports before its task runs

        return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="params override, e.g. generate.n_docs=12000")
    ap.add_argument("--tasks", type=int, default=4, help="ops.data_tasks for the Ray runs (the same for 1 and 2 workers)")
    ap.add_argument("--workers", default="1,2", help="local Ray sizes (num_cpus) to run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    a = ap.parse_args()

    import ray

    from stagewise.machine import describe, label

    tmp = Path(tempfile.mkdtemp(prefix="stagewise-bench-cluster-"))
    try:
        cfg = prepare(a.profile, a.sets, tmp)
        src = tmp / "data" / "02_ingested"
        n_in = sum(1 for f in src.glob("*.jsonl") for _ in f.open())
        load = os.getloadavg()
        print(f"machine: {label(describe())}; cores {os.cpu_count()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"corpus: profile {a.profile} {' '.join(a.sets)} -> {n_in} ingested records, "
              f"{sum(f.stat().st_size for f in src.glob('*.jsonl')) / 2**20:.1f} MiB; ray {ray.__version__}, "
              f"data_tasks {a.tasks}")

        phase(cfg, src, tmp / "warm", None)   # imports, caches: not the baseline's cost
        want = None
        local, ray_runs, breakdown = [], {}, {}
        workers = [int(w) for w in a.workers.split(",")]
        ops_ray = cfg.ops.model_copy(update={"engine": "ray", "data_tasks": a.tasks,
                                             "ray_scratch": str(tmp / "scratch")})
        init_kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        # the phase's executor runs: quality; dedup's signatures, buckets (band groups), clusters
        stages = [a.tasks, a.tasks, min(a.tasks, cfg.dedup.bands), 1]
        for w in workers:   # fixed costs, in a Ray of their own: the timed runs start from cold workers
            t = time.perf_counter()
            ray.init(num_cpus=w, **init_kw)
            init = time.perf_counter() - t
            try:
                breakdown[w] = ray_breakdown(ops_ray, stages)
            finally:
                t = time.perf_counter()
                ray.shutdown()
                breakdown[w] |= {"ray_init_s": init, "ray_shutdown_s": time.perf_counter() - t}
        for r in range(a.repeats):
            out = tmp / f"local{r}"
            local.append(phase(cfg, src, out, None))
            want = want or (files(out / "q"), files(out / "d"))
            for w in workers:
                # a cluster that is up (ops.ray_address: auto): ray.init is outside the phase
                ray.init(num_cpus=w, **init_kw)
                try:
                    with ShardIO() as io:
                        out = tmp / f"ray{w}-{r}"
                        secs = phase(cfg, src, out, ops_ray)
                    assert (files(out / "q"), files(out / "d")) == want, f"ray x{w}: outputs differ from the local run"
                finally:
                    ray.shutdown()
                ray_runs.setdefault(w, []).append((secs, io.seconds, io.calls))

        base = min(local)
        print(f"\n{'variant':18s} {'best s':>8s} {'runs':>20s} {'x local':>8s}")
        print(f"{'local (1 process)':18s} {base:8.2f} {' '.join(f'{s:.2f}' for s in local):>20s} {1:8.2f}")
        for w, runs in ray_runs.items():
            best = min(s for s, _, _ in runs)
            print(f"{'ray, ' + str(w) + ' worker(s)':18s} {best:8.2f} {' '.join(f'{s:.2f}' for s, _, _ in runs):>20s} "
                  f"{best / base:8.2f}")
        if len(ray_runs) >= 2:
            w1, w2 = workers[0], workers[1]
            print(f"\n{w2} workers vs {w1}: {min(s for s, _, _ in ray_runs[w1]) / min(s for s, _, _ in ray_runs[w2]):.2f}x "
                  "speed-up (wall time of 1 / wall time of 2)")
        print(f"\nwhere a Ray run's time goes (seconds; best run):{'':14s}" + "".join(f"{str(w) + ' worker(s)':>13s}" for w in breakdown))
        rows = {"ray.init (once per cluster, outside the phase)": lambda w, b, r: b["ray_init_s"],
                "ray.shutdown (likewise)": lambda w, b, r: b["ray_shutdown_s"],
                "no-op task: first round trip": lambda w, b, r: b["first_task_s"],
                "no-op task: round trip, workers up": lambda w, b, r: b["task_round_trip_s"],
                "placement group + new actor (datatrove, per task)": lambda w, b, r: b["actor_start_s"],
                f"4 executor runs of empty tasks ({'+'.join(map(str, stages))})": lambda w, b, r: b["executor_fixed_s"],
                f"shard I/O in the driver ({ray_runs[workers[0]][0][2]} files)": lambda w, b, r: r[1],
                "the steps' own work (= the local run)": lambda w, b, r: base,
                "rest (worker-side I/O and imports, parallelism)":
                    lambda w, b, r: r[0] - base - b["executor_fixed_s"] - r[1],
                "total (the phase on Ray)": lambda w, b, r: r[0]}
        for name, f in rows.items():
            print(f"  {name:60s}" + "".join(f"{f(w, b, min(ray_runs[w], key=lambda x: x[0])):13.3f}"
                                            for w, b in breakdown.items()))
        print(json.dumps({"machine": describe(), "load_average": load, "records": n_in, "tasks": a.tasks,
                          "local_s": local, "ray_s": {w: [s for s, _, _ in r] for w, r in ray_runs.items()},
                          "breakdown": breakdown}, default=str))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
