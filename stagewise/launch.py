"""Run a training stage on N ranks: `train.launcher: accelerate` (one host) or `ops.engine: ray` (Ray Train).

A stage function decorated with `@on_ranks` notices it is not yet inside a launched process and hands
itself to one of two backends, both carrying the same JSON spec (the stage function by module and
name, the resolved config, its arguments); every rank rebuilds the call from it (`run_spec`) and runs
the same stage function, whose HF/TRL trainer picks up the distributed state; only rank 0 evaluates
and publishes.

- `accelerate`: `accelerate launch --config_file <train.accelerate_config> -m stagewise.launch <spec>`
  on this host; rank 0 writes the result file the caller reads.
- `ray`: a Ray Train `TorchTrainer` of `<stage>.resources.num_workers` workers, each reserving
  `num_cpus`/`num_gpus` (Ray places them on any nodes with those free; DDP over gloo on CPUs, NCCL
  on GPUs). Ray Train brings up torch.distributed across the nodes, so the stage needs no launcher of
  its own on each host. Rank 0 publishes into a folder on its own node and reports it as the run's
  checkpoint; Ray Train persists it to the shared storage (`ops.ray_scratch`: S3 on a cluster) and
  the caller copies it into out_dir: no disk is shared with the ranks' nodes. The stage's batch_size
  is split over the ranks (`rank_batch`), so a step sees the batch one process would.
  Every checkpoint the stage's trainer saves (`save_steps`) is reported to Ray Train too
  (`report_checkpoints`), so it lands in the same storage; when a rank fails (its host lost) Ray
  Train restarts the ranks on the nodes alive (`ops.ray_max_failures`, its `FailureConfig`) and each
  puts `ray.train.get_checkpoint()` back into its checkpoint folder, where the stage's own resume
  (`modeling.train_with_resume`: HF restores weights, optimizer, scheduler, RNG) finds it. Ray's
  `RayTrainReportCallback` would report only the newest `checkpoint-N`, renamed `checkpoint/`: the
  early-stopping stages also keep their best one beside it, so the whole folder travels instead.
  Those checkpoints are named `train-step-N`, the published model `published`: only that one is
  ever copied into out_dir. `prepare_trainer` is not needed either: it only swaps the Trainer's
  dataloaders for Ray Data iterators (the stages keep their own datasets).
  With a remote `ops.ray_scratch` (s3://…) the stage's input folders (every `*_dir` argument but
  out_dir: the parent model or tokenizer, and the curated data with the layers beside it that stages
  read — the raft step's chats, the held-out benchmarks) travel the same way: the caller uploads them
  beside the run's folder, each rank downloads them to its own disk and reads only those. A local
  scratch folder means one host: the ranks read the caller's paths.

An active MLflow run is handed over through MLFLOW_RUN_ID so the trainers' curves land in the
caller's run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RAY_RANKS = "STAGEWISE_RAY_RANKS"   # set inside a Ray Train rank: how many ranks split the stage's batch
PUBLISHED = "published"            # the Ray Train checkpoint holding the stage's published model
TRAIN_CKPT = "train-step-"         # a training checkpoint reported on the way (train-step-<global step>)


def launched() -> bool:
    """True inside a process started by `accelerate launch` (or torchrun), or a Ray Train rank."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCHED" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank_batch(batch: int) -> int:
    """The per-rank batch of a stage whose `batch_size` is one optimizer step's: split over the Ray
    ranks (config checks it divides). The accelerate launcher keeps batch_size per process."""
    return batch // int(os.environ.get(RAY_RANKS, "1"))


def _spec(fn, cfg, kwargs: dict) -> dict:
    """What every rank needs to make the same call: JSON only (nothing is unpickled from disk)."""
    reads = sorted(getattr(cfg, "_reads", ()))   # a StepConfig stays one inside the ranks
    return {"fn": f"{fn.__module__}:{fn.__qualname__}", "cfg": cfg.to_dict(), "reads": reads,
            "kwargs": {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}}


def run_spec(spec: dict):
    """Inside a rank: rebuild the config and the arguments, run the stage function."""
    from stagewise.config import Config, StepConfig

    cfg = Config.model_validate(spec["cfg"])
    if spec.get("reads"):
        cfg = StepConfig(cfg, spec["fn"].rpartition(":")[2], tuple(spec["reads"]))
    kwargs = {k: Path(v) if k.endswith("_dir") else v for k, v in spec["kwargs"].items()}
    module, _, name = spec["fn"].partition(":")
    return getattr(importlib.import_module(module), name)(cfg, **kwargs)


def _mlflow_env() -> dict:
    try:
        import mlflow
    except ImportError:  # pragma: no cover
        return {}
    run = mlflow.active_run()
    return {} if run is None else {"MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}


def relaunch(fn, cfg, **kwargs) -> dict:
    """Run the stage function `fn(cfg, **kwargs)` under `accelerate launch`; return its result."""
    stage = fn.__name__
    conf = Path(cfg.train.accelerate_config)
    if not conf.is_absolute():
        conf = (Path.cwd() / conf) if (Path.cwd() / conf).exists() else ROOT / conf
    if not conf.exists():
        raise FileNotFoundError(f"train.accelerate_config: {conf} not found (see configs/accelerate/)")
    with tempfile.TemporaryDirectory(prefix=f"stagewise-{stage}-") as tmp:
        spec = Path(tmp) / "spec.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({**_spec(fn, cfg, kwargs), "result": str(result)}))
        env = os.environ.copy()
        env["ACCELERATE_LAUNCHED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")   # n processes share the cores
        env.update(_mlflow_env())
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(conf),
               "-m", "stagewise.launch", str(spec)]
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT))
        if proc.returncode != 0:
            raise RuntimeError(f"{stage}: `accelerate launch` failed with exit code {proc.returncode} "
                               f"(config {conf}); see the log above")
        return json.loads(result.read_text())


# ---------------------------------------------------------------- the Ray Train backend
_notes: dict = {}   # what this rank's training left behind (note_rank): the stage returns nothing on ranks > 0


def report_checkpoints(trainer) -> None:
    """Inside a Ray Train rank: every checkpoint the trainer saves goes to Ray Train's storage too.

    The whole checkpoint folder, as the trainer left it after its rotation (the newest `checkpoint-N`
    and, with early stopping, the best one): what a rank restarted on another host restores
    (`_rank_main`) is what a killed local run leaves on its own disk. Every rank reports (a report is a
    barrier); Ray merges their files into one checkpoint (rank 0 writes weights, optimizer and trainer
    state; each rank its own RNG state)."""
    if RAY_RANKS not in os.environ:
        return
    import ray.train
    from transformers import TrainerCallback

    class ReportCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            ray.train.report({"step": state.global_step},
                             checkpoint=ray.train.Checkpoint.from_directory(args.output_dir),
                             checkpoint_dir_name=f"{TRAIN_CKPT}{state.global_step}",
                             delete_local_checkpoint_after_upload=False)   # the trainer keeps rotating them

    trainer.add_callback(ReportCheckpoints())


def note_rank(trainer, resumed: int | None = None) -> None:
    """Inside a Ray Train rank, after training: this rank's world size, its loss curve and a hash of
    its weights (DDP keeps every rank's copy equal; the placement record shows it), and the step it
    resumed from after a restart."""
    if RAY_RANKS not in os.environ:
        return
    import hashlib

    import torch.distributed as dist

    from stagewise.hashing import hash_weights

    _notes.update(world_size=dist.get_world_size() if dist.is_initialized() else 1, resumed_from_step=resumed,
                  weights_sha256=hash_weights(hashlib.sha256(), trainer.model).hexdigest(),
                  loss=[[e["step"], float(e["loss"])] for e in trainer.state.log_history if "loss" in e])


def _storage(root: str):
    """(storage_path, storage_filesystem) for Ray Train: a local folder, or any fsspec URL (s3://...
    through s3fs, which honours AWS_ENDPOINT_URL like the data steps' scratch) wrapped for pyarrow."""
    if "://" not in root:
        return str(Path(root).resolve()), None
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(root)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _check_fits(stage: str, res, need: dict) -> None:
    """Ray Train waits (retrying forever) for ranks no node can hold: refuse such a request at once.
    Counts the nodes alive now; on an autoscaling cluster keep one node of each kind up."""
    import ray

    from stagewise.errors import ConfigError

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    fits = sum(int(min(n.get(k, 0) / v for k, v in need.items()) + 1e-9) for n in nodes)
    if fits < res.num_workers:
        have = sorted({f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}" for n in nodes})
        raise ConfigError(f"{stage}.resources: {res.num_workers} rank(s) of {{CPU: {res.num_cpus:g}, GPU: "
                          f"{res.num_gpus:g}}} each do not fit the Ray cluster (room for {fits}; its nodes: "
                          f"{', '.join(have)}): lower {stage}.resources or add nodes")


def _input_folders(kwargs: dict) -> tuple[dict[str, str], list[tuple[Path, str]]]:
    """The folders a rank reads — every `*_dir` argument but out_dir — as (argument -> relative path, the
    (local folder, relative path) pairs to upload). The curated data goes with the layers the stages read
    beside it (the raft step's chats, the held-out benchmarks), in the workspace's own layout, so
    `benchmarks_dir` and `raft_chats` find them on the rank as they do here."""
    from stagewise.workspace import Workspace

    args, folders = {}, []
    for k, v in kwargs.items():
        if not k.endswith("_dir") or k == "out_dir" or v is None:
            continue
        v = Path(v)
        if k == "curated_dir":
            ws = Workspace(v.parent.parent)
            args[k] = f"ws/data/{v.name}"
            folders += [(d, f"ws/{d.relative_to(ws.root).as_posix()}") for d in
                        (v, ws.raft, ws.benchmarks) if d.is_dir()]
        else:
            args[k] = k
            folders.append((v, k))
    return args, folders


def _ship_inputs(kwargs: dict, url: str) -> dict:
    """Upload the stage's input folders under `url` (fsspec: s3://…, file://…); what a rank needs to fetch them."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    args, folders = _input_folders(kwargs)
    for local, rel in folders:
        fs.makedirs(f"{root}/{rel}", exist_ok=True)
        fs.put(f"{local.resolve()}/", f"{root}/{rel}/", recursive=True)   # trailing slashes: the contents
    return {"url": url, "args": args}


def _fetch_inputs(inputs: dict, dest: Path) -> dict:
    """Inside a rank: download the shipped folders to this node's disk; the arguments that point at them."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(inputs["url"])
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(f"{root}/", f"{dest}/", recursive=True)
    return {k: str(dest / rel) for k, rel in inputs["args"].items()}


def _rank_main(config: dict) -> None:
    """One Ray Train worker: the stage function on this rank; rank 0 reports the published folder."""
    import shutil
    import socket

    import ray
    import ray.train

    from stagewise.workspace import checkpoint_dir

    ctx = ray.train.get_context()
    os.environ.update(config["env"], **{RAY_RANKS: str(ctx.get_world_size())})
    spec = json.loads(config["spec"])
    # this node's own disk, the same path on every attempt: a restored trainer state names its best
    # checkpoint by path; a killed attempt's leftovers on this node are not what Ray kept, so they go
    tmp = Path(tempfile.gettempdir()) / f"stagewise-{config['name']}-r{ctx.get_world_rank()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out = tmp / "out"   # rank 0's copy travels as the published checkpoint
        spec["kwargs"]["out_dir"] = str(out)
        if config.get("inputs"):
            spec["kwargs"].update(_fetch_inputs(config["inputs"], tmp / "in"))
        restored = ray.train.get_checkpoint()   # a restart: the last checkpoint a rank reported
        if restored is not None and Path(restored.path).name.startswith(TRAIN_CKPT):
            restored.to_directory(str(checkpoint_dir(out)))   # where the stage's own resume looks
        _notes.clear()
        result = run_spec(spec)
        rt = ray.get_runtime_context()
        note = dict(_notes, rank=ctx.get_world_rank(), node_ip=ray.util.get_node_ip_address(),
                    read={k: v for k, v in spec["kwargs"].items() if k.endswith("_dir") and k != "out_dir"},
                    node_id=rt.get_node_id(), host=socket.gethostname(), reserved=rt.get_assigned_resources())
        # every rank's note goes to rank 0 (all ranks must reach report() anyway: it is a barrier)
        import torch.distributed as dist

        notes = [None] * ctx.get_world_size()
        dist.all_gather_object(notes, note)
        ckpt = None
        if ctx.get_world_rank() == 0 and (out / "stage_info.json").exists():
            (out / "ranks.json").write_text(json.dumps(notes))
            ckpt = ray.train.Checkpoint.from_directory(out)
        ray.train.report({"result": json.dumps(result if ctx.get_world_rank() == 0 else None, default=str)},
                         checkpoint=ckpt, checkpoint_dir_name=PUBLISHED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ray_launch(fn, cfg, **kwargs) -> dict:
    """Run `fn(cfg, **kwargs)` as a Ray Train TorchTrainer placed by `<stage>.resources`; copy the
    published model into out_dir; record which node ran which rank."""
    import shutil
    import uuid

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stagewise.shards import ray_session, record_placement

    stage = fn.__name__
    full = cfg.unrestricted()
    ops, res = full.ops, full.section(stage).resources
    out_dir = Path(kwargs["out_dir"])
    scratch = ops.ray_scratch or str(out_dir.parent / f"{out_dir.name}.ray")   # a local Ray: beside out_dir
    path, fs = _storage(f"{scratch.rstrip('/')}/train")
    name = f"{stage}-{uuid.uuid4().hex[:8]}"
    spec = _spec(fn, cfg, kwargs)
    need = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
    with ray_session(ops):
        _check_fits(stage, res, need)
        try:
            inputs = None
            if "://" in scratch:   # no disk shared with the ranks' nodes: the inputs travel through the store
                inputs = _ship_inputs(kwargs, f"{scratch.rstrip('/')}/train/{name}-inputs")
            outcome = TorchTrainer(
                _rank_main,
                train_loop_config={"spec": json.dumps(spec), "env": _mlflow_env(), "inputs": inputs, "name": name},
                scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.num_gpus > 0,
                                             resources_per_worker=need),
                # one checkpoint kept: the newest training checkpoint, replaced at the end by the published model
                run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                     checkpoint_config=CheckpointConfig(num_to_keep=1),
                                     failure_config=FailureConfig(max_failures=ops.ray_max_failures)),
            ).fit()
            # never a training checkpoint in the published model's place (a run that ended without publishing)
            if outcome.checkpoint is None or Path(outcome.checkpoint.path).name != PUBLISHED:
                raise RuntimeError(f"{stage}: the Ray Train run {name} finished without a published model "
                                   f"(storage {scratch}/train; its last checkpoint: "
                                   f"{outcome.checkpoint.path if outcome.checkpoint else None})")
            tmp = out_dir.parent / f".{out_dir.name}.incoming"
            shutil.rmtree(tmp, ignore_errors=True)
            outcome.checkpoint.to_directory(str(tmp))
            notes = json.loads((tmp / "ranks.json").read_text())
            (tmp / "ranks.json").unlink()
            result = json.loads(outcome.metrics["result"])
            # rank 0 published into its own node's folder: name the folder the caller asked for instead
            info = json.loads((tmp / "stage_info.json").read_text())
            for d in (result, info):
                if "model_dir" in d:
                    d["model_dir"] = str(out_dir)
            (tmp / "stage_info.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
        finally:
            import pyarrow.fs

            for d in (name, f"{name}-inputs"):
                try:   # the run's folder (its checkpoint is out_dir now), the shipped inputs; the placement record stays
                    (fs or pyarrow.fs.LocalFileSystem()).delete_dir(f"{path}/{d}")
                except (OSError, FileNotFoundError):  # nothing was written
                    pass
    record_placement(scratch.rstrip("/"), "train", stage, notes)
    resumed = notes[0].get("resumed_from_step")
    logging.getLogger("stagewise").info("%s: %d rank(s) on node(s) %s%s", stage, len(notes),
                                        sorted({n["node_ip"] for n in notes}),
                                        f", resumed from its checkpoint at step {resumed}" if resumed else "")
    return result


def on_ranks(fn=None, *, when: Callable[[Any], bool] | None = None):
    """Decorate a stage function `fn(cfg, ...)`. Outside a launched process (and when `when(cfg)`, if
    given): with `ops.engine: ray` it runs as a Ray Train job placed by `<stage>.resources`; with
    `train.launcher: accelerate` under `accelerate launch`; otherwise, and inside a rank, as written."""
    def wrap(f):
        sig = inspect.signature(f)

        @functools.wraps(f)
        def run(cfg, *args, **kwargs):
            if not launched() and (when is None or when(cfg)):
                full = cfg.unrestricted()
                backend = (ray_launch if full.ops.engine == "ray"
                           else relaunch if cfg.train.launcher == "accelerate" else None)
                if backend is not None:
                    bound = sig.bind(cfg, *args, **kwargs)
                    bound.apply_defaults()
                    return backend(run, cfg, **{k: v for k, v in bound.arguments.items() if k != "cfg"})
            return f(cfg, *args, **kwargs)

        return run

    return wrap(fn) if fn is not None else wrap


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = run_spec(spec)
    if is_main_process():
        Path(spec["result"]).write_text(json.dumps(res, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
