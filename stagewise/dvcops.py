"""DVC bookkeeping for the data steps, through DVC's own Python API.

The pipeline runs a data step in-process (as a Prefect task) and then `dvc commit`s the stage, so
`dvc.lock` records exactly what was produced from which params and deps: `dvc status` stays clean,
`dvc repro` (which runs the same step through `stagewise step <name>`) agrees, and the md5 DVC
records is the data hash that goes into model lineage.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path


def _repo_class():
    from dvc.repo import Repo

    from stagewise.logs import quiet_again

    quiet_again("dvc", "dvc_objects", "dvc_data")   # `import dvc` sets them to INFO with its own handlers
    return Repo


def ensure_repo(root: Path) -> None:
    """`dvc init` a workspace that is not a DVC repo yet (no-SCM when it is not a git checkout)."""
    if (root / ".dvc").is_dir():
        return
    Repo = _repo_class()

    in_git = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    no_scm = in_git.returncode != 0 or Path(in_git.stdout.strip()).resolve() != root.resolve()
    Repo.init(str(root), no_scm=no_scm)


def is_current(root: Path, stage: str) -> bool:
    """True when dvc.lock says the stage's deps, params and outs are unchanged."""
    Repo = _repo_class()

    # DVC resolves params files against the cwd, not the repo root.
    with contextlib.chdir(root), Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


def stale_stages(root: Path) -> set[str]:
    """Names of the stages whose deps, params or outs differ from dvc.lock: one `dvc status` for all."""
    Repo = _repo_class()
    with contextlib.chdir(root), Repo(str(root)) as repo:
        return {name.rsplit(":", 1)[-1] for name in repo.status()}


def commit(root: Path, stage: str, stats: dict, metrics_path: Path | None = None) -> str | None:
    """Write the stage's metrics file and record the stage in dvc.lock. Returns the out md5."""
    from stagewise.hashing import dvc_out_hash

    if metrics_path is not None:
        write_metrics(metrics_path, stats)
    Repo = _repo_class()
    with contextlib.chdir(root), Repo(str(root)) as repo:
        repo.commit(stage, force=True)
    return dvc_out_hash(root, stage)


def write_metrics(path: Path, stats: dict) -> None:
    """Flat numeric view of a step's stats for `dvc metrics show`."""
    flat: dict = {}
    for key in ("input", "kept", "removed", "quarantined"):
        val = stats.get(key)
        if isinstance(val, dict):
            flat[key] = {k: v for k, v in val.items() if isinstance(v, (int, float))}
        elif isinstance(val, (int, float)):
            flat[key] = val
    if not flat:
        flat = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(flat, indent=1, sort_keys=True))
    tmp.replace(path)


def dvc_available() -> bool:
    return shutil.which("dvc") is not None
