"""One error path for everything a user can fix: what, where, the fix, and a documented exit code.

Exit codes (docs/errors.md): 0 done, 1 gate failed under --strict (or a refused promotion),
2 bad input or configuration, 3 workspace or store problem, 130 interrupted (SIGINT),
143 terminated (SIGTERM). A traceback is printed only with --verbose.

The project's own exceptions (ConfigError, BadInput, WorkspaceLocked, StoreError, ...) are, or are
mapped to, a StagewiseError with an exit code. The CLI prints `error: <message>` for them; Prefect's
task and flow engines log every failure with a traceback, so `quiet_prefect_crashes` drops those
records for our own errors (the CLI prints the one line they would bury).
"""

from __future__ import annotations

import logging
import os

BAD_INPUT, STORE, SIGINT_EXIT, SIGTERM_EXIT = 2, 3, 130, 143


class StagewiseError(Exception):
    """A failure the user can fix. `exit_code`: 2 bad input/config, 3 workspace/store."""

    exit_code = BAD_INPUT


class UserError(StagewiseError):
    """Bad input, arguments or settings (exit 2)."""


class ConfigError(UserError, ValueError):
    """A params.yaml problem, phrased for the person who has to fix it (stagewise.config raises it)."""


class StoreError(StagewiseError):
    """The workspace or a store (MLflow, Prefect, disk) cannot be used as it is (exit 3)."""

    exit_code = STORE


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal or because its orchestration server died.

    A KeyboardInterrupt, so every library on the way (HF Trainer, Prefect's engine) unwinds as it
    does for Ctrl-C: runs end, locks are released.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def _chain(exc: BaseException | None):
    """exc, then what it was raised from or during (both links), and exception-group members."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend([e.__cause__, e.__context__])


def user_facing(exc: BaseException) -> tuple[str, int] | None:
    """(message, exit code) when `exc` is (or wraps) one of the project's own errors, else None.

    Prefect re-raises a task's exception as is; the chain is walked for errors a library wrapped.
    """
    from filelock import Timeout

    for e in _chain(exc):
        if isinstance(e, Interrupted):
            return e.message, e.exit_code
        if isinstance(e, StagewiseError):
            return str(e), e.exit_code
        if isinstance(e, Timeout):
            return f"{e} is held by another process; wait for it to finish", STORE
    for e in _chain(exc):
        # SQLite behind MLflow/Prefect reports a read-only or full disk in its own words
        text = str(e).lower()
        if type(e).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "mlflow") and any(
                m in text for m in ("readonly database", "disk is full", "disk i/o error", "unable to open database")):
            from stagewise.redact import redact

            first = redact(str(e)).strip().splitlines()[0][:200]
            return (f"the tracking store cannot be written ({first}) — free space or make the workspace "
                    "writable, then re-run (finished stages are reused from the cache)"), STORE
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            where = e.filename or "the workspace"
            return (f"{where}: {os.strerror(e.errno)} — free space or make the workspace writable, "
                    "then re-run (finished stages are reused from the cache)"), STORE
    return None


import errno as _errno  # noqa: E402

_DISK_ERRNOS = {_errno.ENOSPC, _errno.EROFS, _errno.EACCES, _errno.EDQUOT, _errno.EPERM}


def is_interrupt(exc: BaseException) -> bool:
    """A signal stopped the run (Ctrl-C, SIGTERM — Prefect may wrap ours in its TerminationSignal)."""
    return any(isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TerminationSignal" for e in _chain(exc))


def one_line(message: str) -> str:
    """Messages may carry a `fix:` on a second line; keep each on one line for the console."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[1].startswith("fix:"):
        return f"{lines[0]} — {lines[1]}" + "".join(f"\n  {ln}" for ln in lines[2:])
    return "\n  ".join(lines)


# ------------------------------------------------------------------ verbosity and Prefect's logs
_verbose = False


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = bool(on)


def verbose() -> bool:
    return _verbose or os.environ.get("STAGEWISE_VERBOSE", "") not in ("", "0", "false")


class _DropOwnErrors(logging.Filter):
    """Drop Prefect engine records about a failure that is one of ours (the CLI prints it once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return user_facing(exc) is None
        # "Finished in state Failed('Task run encountered an exception BadInput: ...')" has no exc_info
        msg = record.getMessage()
        if "aborted by an interrupt signal" in msg:   # Ctrl-C/SIGTERM: the CLI says it once
            return False
        return not any(f"exception {n}" in msg or f"{n}(" in msg for n in _own_names())


def _own_names() -> set[str]:
    """Class names of the project's own errors: every StagewiseError subclass defined so far (an error
    that was raised had its module imported), so a new one needs no entry in a list here."""
    names, todo = {"Interrupted", "KeyboardInterrupt"}, [StagewiseError]
    while todo:
        c = todo.pop()
        names.add(c.__name__)
        todo.extend(c.__subclasses__())
    return names

_FILTER = _DropOwnErrors()


def quiet_prefect_crashes() -> None:
    """Install the filter on the loggers Prefect's task and flow engines report failures on."""
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine",
                 "prefect.engine"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
