"""SIGINT / SIGTERM and a dying orchestration server: stop the run at once, cleanly, with an exit code.

The one place the project handles signals. While `stop_on_signals()` is active, SIGINT and SIGTERM
raise `Interrupted` (a KeyboardInterrupt) in the main thread, where training runs: the HF Trainer,
Prefect's engine and our `with` blocks unwind as for Ctrl-C — the stage's MLflow run and the
pipeline run end KILLED, the workspace lock is released, Prefect's temporary server is stopped at
exit — and the CLI exits 130 (SIGINT) or 143 (SIGTERM). A second signal while unwinding exits at
once (the kernel drops the flock).

`watch_server(process)` does the same when Prefect's temporary server dies mid-run (exit 3):
without it the run would go on training and registering versions no orchestration records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from stagewise.errors import SIGINT_EXIT, SIGTERM_EXIT, STORE, Interrupted

log = logging.getLogger("stagewise")

_state = {"reason": None, "count": 0}


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    _state["count"] += 1
    reason = _state["reason"]
    if reason is None:
        code = SIGINT_EXIT if signum == signal.SIGINT else SIGTERM_EXIT
        name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM"
        reason = (f"interrupted by {name}: the run stopped, its MLflow runs are marked KILLED and the "
                  "workspace is free; re-run to resume (finished stages are reused)", code)
    if _state["count"] > 1:  # a second signal while unwinding: leave now
        os._exit(reason[1])
    _state["reason"] = reason
    raise Interrupted(*reason)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT/SIGTERM → Interrupted in the main thread (no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.update(reason=None, count=0)
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_reason() -> tuple[str, int] | None:
    """(message, exit code) when a signal or the server's death stopped this run, else None.

    Asked first by the CLI: while the run unwinds, libraries may raise their own errors over ours
    (Prefect's client against a dead server raises httpx.ConnectError).
    """
    return _state["reason"] if _state["count"] else None


def leave_now(exc: BaseException, code: int) -> None:
    """After a signal, once the run has unwound and said why: run the exit hooks and leave.

    Everything that matters is closed by then (MLflow runs KILLED, lock released); the atexit hooks
    stop Prefect's temporary server. What is skipped is the interpreter's own teardown, which takes
    ~10 s with torch, lm-eval and datasets loaded on a busy 2-core machine — the difference between
    exiting within 10 s of Ctrl-C and not. Only for a real signal (never inside a test's CliRunner).
    """
    if _state["count"] == 0:
        return
    import atexit
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    atexit._run_exitfuncs()
    os._exit(code)


def watch_server(process, poll: float = 1.0, grace: float = 15.0) -> threading.Event:
    """Interrupt the main thread when `process` (Prefect's temporary server) exits; set the event to stop."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll):
            code = process.poll()
            if code is None:
                continue
            if stop.is_set():
                return
            _state["reason"] = (
                f"Prefect's temporary server (pid {process.pid}) exited with code {code} mid-run: the run "
                "stopped rather than train without orchestration; re-run to resume (or point "
                "PREFECT_API_URL at a long-lived `prefect server start`)", STORE)
            log.error("Prefect's temporary server exited (code %s): stopping the run", code)
            # A real signal, not _thread.interrupt_main(): the main thread may be blocked waiting on
            # Prefect (a subflow's future), and only a delivered signal wakes a blocked wait. SIGINT:
            # Prefect's flow engine answers SIGTERM with its own TerminationSignal.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            # Unwinding reports every state change to the dead API, through Prefect's client retries
            # (minutes). Past the grace period, leave: the lock goes with the process; runs left
            # RUNNING are closed KILLED by the next run.
            if not stop.wait(grace):
                import sys

                sys.stderr.write(f"error: {_state['reason'][0]}\n")
                sys.stderr.flush()
                os._exit(STORE)
            return

    threading.Thread(target=watch, name="prefect-server-watch", daemon=True).start()
    return stop
