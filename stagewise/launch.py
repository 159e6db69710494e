"""`train.launcher: accelerate` — run a training stage under `accelerate launch`.

A stage function decorated with `@accelerated` notices it is not yet inside a launched process and calls `relaunch(...)`:
that writes the resolved config and the stage's arguments to a spec file, runs
`accelerate launch --config_file <train.accelerate_config> -m stagewise.launch <spec>`, waits,
and returns the result the main process wrote. Inside, every rank runs the same stage function
(HF/TRL trainers pick up the distributed state: DDP over gloo on CPU); only the main process
evaluates and publishes out_dir. An active MLflow run is handed over through MLFLOW_RUN_ID so
the trainers' curves land in the caller's run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def launched() -> bool:
    """True inside a process started by `accelerate launch` (or torchrun)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCHED" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def relaunch(fn, cfg, **kwargs) -> dict:
    """Run the stage function `fn(cfg, **kwargs)` under `accelerate launch`; return its result.

    Every rank imports `fn` by its module and name (the spec file carries both)."""
    stage = fn.__name__
    conf = Path(cfg.train.accelerate_config)
    if not conf.is_absolute():
        conf = (Path.cwd() / conf) if (Path.cwd() / conf).exists() else ROOT / conf
    if not conf.exists():
        raise FileNotFoundError(f"train.accelerate_config: {conf} not found (see configs/accelerate/)")
    with tempfile.TemporaryDirectory(prefix=f"stagewise-{stage}-") as tmp:
        spec = Path(tmp) / "spec.json"
        result = Path(tmp) / "result.json"
        reads = sorted(getattr(cfg, "_reads", ()))   # a StepConfig stays one inside the ranks
        spec.write_text(json.dumps({"fn": f"{fn.__module__}:{fn.__qualname__}", "cfg": cfg.to_dict(), "reads": reads,
                                    "result": str(result),
                                    "kwargs": {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}}))
        env = os.environ.copy()
        env["ACCELERATE_LAUNCHED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")   # n processes share the cores
        try:
            import mlflow

            run = mlflow.active_run()
            if run is not None:
                env["MLFLOW_RUN_ID"] = run.info.run_id
                env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
        except ImportError:  # pragma: no cover
            pass
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(conf),
               "-m", "stagewise.launch", str(spec)]
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT))
        if proc.returncode != 0:
            raise RuntimeError(f"{stage}: `accelerate launch` failed with exit code {proc.returncode} "
                               f"(config {conf}); see the log above")
        return json.loads(result.read_text())


def accelerated(fn=None, *, when: Callable[[Any], bool] | None = None):
    """Decorate a stage function `fn(cfg, ...)`: with `train.launcher: accelerate` (and `when(cfg)`, if
    given) a call outside a launched process relaunches it under `accelerate launch`; inside one, and
    with the in-process launcher, it runs as written."""
    def wrap(f):
        sig = inspect.signature(f)

        @functools.wraps(f)
        def run(cfg, *args, **kwargs):
            if cfg.train.launcher == "accelerate" and not launched() and (when is None or when(cfg)):
                bound = sig.bind(cfg, *args, **kwargs)
                bound.apply_defaults()
                return relaunch(run, cfg, **{k: v for k, v in bound.arguments.items() if k != "cfg"})
            return f(cfg, *args, **kwargs)

        return run

    return wrap(fn) if fn is not None else wrap


def main(spec_path: str) -> None:
    from stagewise.config import Config, StepConfig

    spec = json.loads(Path(spec_path).read_text())
    cfg = Config.model_validate(spec["cfg"])
    if spec.get("reads"):
        cfg = StepConfig(cfg, spec["fn"].rpartition(":")[2], tuple(spec["reads"]))
    kwargs = {k: Path(v) if k.endswith("_dir") else v for k, v in spec["kwargs"].items()}
    module, _, name = spec["fn"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    res = fn(cfg, **kwargs)
    if is_main_process():
        Path(spec["result"]).write_text(json.dumps(res, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
