"""Workspace lock: a second run in the same workspace waits (saying for whom) or fails clearly;
a killed holder never leaves a stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stagewise.lock import WorkspaceLocked, holder, lock_path, workspace_lock

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from stagewise.lock import workspace_lock
    with workspace_lock(Path(sys.argv[1]), timeout=0, run="holder-run"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold(root: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the workspace for `seconds` (returns once it holds the lock)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_fails_at_once_naming_the_holder(tmp_path):
    p = hold(tmp_path, 30)
    try:
        with pytest.raises(WorkspaceLocked) as e:
            with workspace_lock(tmp_path, timeout=0):
                pass
        msg = str(e.value)
        assert "holder-run" in msg and f"pid {p.pid}" in msg and "ops.lock_timeout" in msg
    finally:
        p.kill()
        p.wait()


def test_second_run_waits_then_runs(tmp_path, caplog):
    p = hold(tmp_path, 2)
    t0 = time.time()
    with caplog.at_level("WARNING", logger="stagewise"):
        with workspace_lock(tmp_path, timeout=60, run="second", poll=0.1) as info:
            waited = time.time() - t0            # the holder kept it ~2 s after we first asked
            assert holder(tmp_path)["run"] == "second" and info["pid"] == os.getpid()
    assert "waiting for it" in caplog.text and "holder-run" in caplog.text
    assert 1.0 < waited < 55 and p.wait(timeout=10) == 0
    assert not lock_path(tmp_path).with_suffix(".lock.json").exists()   # holder info goes with the lock


def test_wait_times_out_with_a_clear_error(tmp_path):
    p = hold(tmp_path, 30)
    try:
        with pytest.raises(WorkspaceLocked, match=r"still in use by run holder-run.*after 1 s"):
            with workspace_lock(tmp_path, timeout=1, poll=0.1):
                pass
    finally:
        p.kill()
        p.wait()


def test_kill_9_of_the_holder_frees_the_workspace(tmp_path):
    p = hold(tmp_path, 300)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # Stale holder info is still on disk, but the kernel dropped the flock with the process.
    assert holder(tmp_path)["pid"] == p.pid
    with workspace_lock(tmp_path, timeout=0, run="after-crash"):
        assert holder(tmp_path)["run"] == "after-crash"
