"""One pipeline run per workspace at a time.

Two runs against one workspace would race on everything a run shares: `params.resolved.yaml`
(what `dvc status` compares against), `dvc.lock`, the data layers, `models/<stage>/` and the
registry aliases. So a run holds `.stagewise/run.lock` from before it resolves its config until its
summary is written; a second run waits for it (`ops.lock_timeout` seconds, saying whom it waits
for) and then finds everything the first one built in the cache.

The lock is `filelock`'s `fcntl.flock` on Linux/macOS: the kernel drops it when the holding process
dies, so a `kill -9` never leaves a stale lock behind. The holder's identity (pid, host, run,
start time, command) sits beside it in `run.lock.json` for the message. flock is per host: for
runs on several machines against one shared workspace use a shared store instead (see
docs/operations.md).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from stagewise.errors import StoreError

log = logging.getLogger("stagewise")


class WorkspaceLocked(StoreError, RuntimeError):
    """Another run holds the workspace (and did not let go within the timeout)."""


def lock_path(root: Path) -> Path:
    return Path(root) / ".stagewise" / "run.lock"


def holder(root: Path) -> dict:
    """Who holds (or last held) the workspace lock, as its holder wrote it; {} if unknown."""
    try:
        return json.loads(lock_path(root).with_suffix(".lock.json").read_text())
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    if not info:
        return "another process"
    return (f"run {info.get('run', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"since {info.get('since', '?')}: {info.get('command', '')})")


@contextmanager
def workspace_lock(root: Path, timeout: float = 3600, run: str | None = None, poll: float = 1.0) -> Iterator[dict]:
    """Hold the workspace for one run; wait up to `timeout` s (0: fail at once, < 0: wait forever).

    Raises WorkspaceLocked naming the holder when the wait runs out.
    """
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        other = describe(holder(root))
        if timeout == 0:
            raise WorkspaceLocked(
                f"workspace {root} is in use by {other}. Wait for it to finish, or set ops.lock_timeout "
                f"(seconds) to queue behind it, e.g. --set ops.lock_timeout=3600") from None
        log.warning("workspace %s is in use by %s; waiting for it%s", root, other,
                    "" if timeout < 0 else f" (up to {timeout:.0f} s, ops.lock_timeout)")
        t0 = time.time()
        try:
            lock.acquire(timeout=timeout, poll_interval=poll)
        except Timeout:
            raise WorkspaceLocked(
                f"workspace {root} is still in use by {describe(holder(root))} after {timeout:.0f} s "
                f"(ops.lock_timeout). Raise ops.lock_timeout or run in another workspace.") from None
        log.warning("workspace %s is free after %.0f s; starting", root, time.time() - t0)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "run": run or "?",
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    meta = path.with_suffix(".lock.json")
    tmp = meta.with_name(f".{meta.name}.{os.getpid()}")
    tmp.write_text(json.dumps(info))
    tmp.replace(meta)
    try:
        yield info
    finally:
        meta.unlink(missing_ok=True)
        lock.release()


def run_lock(root: Path, config_path: Path, profile: str | None, overrides: list[str], run_id: str | None = None):
    """The workspace lock with the run's own `ops.lock_timeout` (profile and --set applied)."""
    from stagewise.config import load_config

    cfg = load_config(config_path, profile, overrides)
    return workspace_lock(root, timeout=cfg.ops.lock_timeout, run=run_id)
