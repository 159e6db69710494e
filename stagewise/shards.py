"""A data step's own work split into tasks: locally in this process, or on Ray (`ops.engine: ray`).

A step hands `run_tasks` a pure function and one input per task; on Ray each input becomes one
task of datatrove's `RayPipelineExecutor` (the executor datatrove's own multi-stage pipelines run
on), placed wherever the cluster has a free CPU. Inputs and outputs travel through a scratch
folder (datatrove's DataFolder: a local folder on one host, `s3://...` on a cluster) as JSON or
`.npz` (never pickles). Outputs come back in task order, so a step that splits its records into
contiguous shards and replays the results in that order writes exactly what one process writes
(tests/test_ops_ray.py: identical for any `ops.data_tasks`).

Stages run one after another here rather than through the executor's `depends=`: a dependency
with a failed task is polled every two minutes there, forever; here it raises.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger("stagewise")


def slices(n: int, tasks: int) -> list[tuple[int, int]]:
    """`tasks` contiguous [lo, hi) ranges covering range(n) in order (sizes differ by at most one;
    empty ones when n < tasks)."""
    bounds = [n * k // tasks for k in range(tasks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def engine(ops) -> str:
    return getattr(ops, "engine", "local") if ops is not None else "local"


def n_tasks(ops) -> int:
    """How many shards a step splits into: 1 locally (one process is one task), ops.data_tasks on Ray."""
    return ops.data_tasks if engine(ops) == "ray" else 1


# ---------------------------------------------------------------- Ray session
@contextmanager
def ray_session(ops) -> Iterator[None]:
    """Connect to `ops.ray_address` (`auto`, `ray://host:10001`), or start a local Ray of
    `ops.ray_num_cpus` CPUs when it is null; a Ray this call started is shut down on the way out."""
    import ray

    if ray.is_initialized():
        yield
        return
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if ops.ray_address:
        ray.init(address=ops.ray_address, **kw)
    else:
        ray.init(num_cpus=ops.ray_num_cpus, **kw)
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- payloads (JSON or npz, never pickle)
def _dump(folder, name: str, value: Any) -> None:
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        buf = io.BytesIO()
        np.savez(buf, **value)
        with folder.open(f"{name}.npz", "wb") as f:
            f.write(buf.getvalue())
    else:
        with folder.open(f"{name}.json", "wt") as f:
            json.dump(value, f)


def _load(folder, name: str) -> Any:
    if folder.isfile(f"{name}.npz"):
        with folder.open(f"{name}.npz", "rb") as f:
            with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    with folder.open(f"{name}.json", "rt") as f:
        return json.load(f)


def _task_step(fn, folder, has_shared: bool):
    """The datatrove PipelineStep one task runs: input <rank> (+ the shared input) -> output <rank>."""
    from datatrove.pipeline.base import PipelineStep

    class StagewiseTask(PipelineStep):
        name = fn.__name__
        type = "stagewise"

        def run(self, data, rank: int = 0, world_size: int = 1):
            import socket

            import ray

            shared = _load(folder, "shared") if has_shared else None
            with self.track_time("task"):
                out = fn(_load(folder, f"in/{rank:05d}"), shared)
            _dump(folder, f"out/{rank:05d}", out)
            ctx = ray.get_runtime_context()
            _dump(folder, f"placement/{rank:05d}", {"task": rank, "node_id": ctx.get_node_id(),
                                                   "node_ip": ray.util.get_node_ip_address(),
                                                   "host": socket.gethostname()})
            return None

    return StagewiseTask()


def run_tasks(fn: Callable[[Any, Any], Any], inputs: list, ops, shared: Any = None, step: str = "") -> list:
    """[fn(x, shared) for x in inputs], each call one task: in this process (`ops.engine: local`),
    or one Ray task each through datatrove's RayPipelineExecutor (`ray`). `fn` must be a module-level
    function (Ray workers import it by name)."""
    if engine(ops) != "ray":
        return [fn(x, shared) for x in inputs]
    from datatrove.executor import RayPipelineExecutor
    from datatrove.io import get_datafolder

    root = ops.ray_scratch or str(Path(".stagewise") / "shards")   # tasks/__init__.py sets the workspace's
    run = get_datafolder(f"{root.rstrip('/')}/{step or fn.__name__}-{fn.__name__}-{uuid.uuid4().hex[:8]}")
    try:
        for rank, x in enumerate(inputs):
            _dump(run, f"in/{rank:05d}", x)
        if shared is not None:
            _dump(run, "shared", shared)
        executor = RayPipelineExecutor(
            pipeline=[_task_step(fn, run, shared is not None)], tasks=len(inputs), logging_dir=run,
            cpus_per_task=1, mem_per_cpu_gb=ops.ray_task_memory_gb, skip_completed=True)
        with ray_session(ops):
            executor.run()
        missing = executor.get_incomplete_ranks()
        if missing:
            raise RuntimeError(f"{step} {fn.__name__}: Ray tasks {missing} of {len(inputs)} did not complete "
                               f"(their logs: {run.path}/logs/)")
        placement = [_load(run, f"placement/{rank:05d}") for rank in range(len(inputs))]
        log.info("%s %s: %d task(s) on node(s) %s", step, fn.__name__, len(inputs),
                 sorted({p["node_ip"] for p in placement}))
        record_placement(root, step, fn.__name__, placement)
        return [_load(run, f"out/{rank:05d}") for rank in range(len(inputs))]
    finally:
        if run.fs.exists(run.path):
            run.fs.rm(run.path, recursive=True)


def record_placement(root: str, step: str, stage: str, placement: list[dict]) -> None:
    """<scratch>/placement/<step>-<stage>.json: which node ran which task (the run folders are removed)."""
    from datatrove.io import get_datafolder

    folder = get_datafolder(root)
    name = f"placement/{step}-{stage}.json"
    with folder.open(name, "wt") as f:
        json.dump(placement, f)
