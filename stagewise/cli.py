"""`stagewise` command line. Heavy libraries are imported inside commands: `--help` stays instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

import tasks
from stagewise.cli_common import split_names as _split

STEPS_HELP = ("Steps (module tasks/<step>.py = DVC stage = params section = MLflow run = Prefect task):\n"
              + "; ".join(f"{kind}: " + ", ".join(s.name for s in tasks.of_kind(kind)) for kind in ("data", "train", "ship"))
              + ".")

EXIT_CODES = """Exit codes: 0 done; 1 gate failed with --strict, or a refused promotion; 2 bad input or config;
3 workspace or store problem (locked, read-only, full, broken MLflow store); 130 interrupted (Ctrl-C);
143 terminated (SIGTERM). docs/errors.md lists the messages."""


class _OneErrorPath(TyperGroup):
    """Every command's failure ends here: one `error:` line and a documented exit code.

    The traceback is printed only with --verbose (or STAGEWISE_VERBOSE=1); an exception that is not
    one of the project's own is a bug and keeps its traceback.
    """

    def invoke(self, ctx):  # noqa: D401
        import typer.exceptions

        from stagewise.errors import one_line, set_verbose, user_facing, verbose

        # typer's own control flow (Exit, Abort, usage errors) passes through untouched
        passthrough = tuple(getattr(typer, n) for n in ("Exit", "Abort") if hasattr(typer, n)) + (
            typer.exceptions.TyperException,)
        set_verbose("--verbose" in sys.argv[1:] or "-v" in sys.argv[1:])
        try:
            return super().invoke(ctx)
        except passthrough:
            raise
        except BaseException as e:  # noqa: BLE001 - the one place failures become exit codes
            if isinstance(e, SystemExit):
                raise
            from stagewise.signals import stop_reason

            known = stop_reason() or user_facing(e)
            if known is None and isinstance(e, KeyboardInterrupt):
                known = ("interrupted", 130)
            if known is None:
                raise
            if verbose():
                import traceback

                traceback.print_exception(e)
            message, code = known
            typer.echo(f"error: {one_line(message)}", err=True)
            from stagewise.signals import leave_now

            leave_now(e, code)
            raise typer.Exit(code) from None


app = typer.Typer(
    cls=_OneErrorPath,
    help=f"Stagewise: one Prefect DAG from raw text to a promoted model.\n\n{STEPS_HELP}\n\n{EXIT_CODES}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", metavar="",
                                       help="Tracebacks and library logs (also each command's own --verbose).")) -> None:
    from stagewise.errors import set_verbose

    if verbose:
        set_verbose(True)
    else:
        from stagewise.logs import quiet_noisy_loggers

        quiet_noisy_loggers()


@app.command()
def run(
    profile: str = typer.Option("demo", help="Profile from params.yaml `profiles:` (smoke, demo, smollm2; "
                                             "`stagewise profiles` lists them)."),
    stages: Optional[list[str]] = typer.Option(None, help="Comma-separated steps to run (default: all)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override, e.g. --set sft.epochs=2 (repeatable)."),
    config: Path = typer.Option(Path("params.yaml"), help="The params file (its folder is the workspace)."),
    force: bool = typer.Option(False, metavar="", help="Re-run every step, ignoring caches."),
    force_stage: Optional[list[str]] = typer.Option(None, help="Re-run this step, and every stage trained on top of it (repeatable / comma-separated)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="Library logs too."),
    strict: bool = typer.Option(False, "--strict", metavar="", help="Exit 1 when the gate fails (for CI and schedulers)."),
) -> None:
    """Run the pipeline end to end and print the summary table.

    Exit codes: 0 done (the gate verdict is in the table and summary.json), 1 gate failed with --strict,
    2 bad config, arguments or input data, 3 workspace or store problem (locked, read-only, full, broken
    MLflow store, orchestration server died), 130 Ctrl-C, 143 SIGTERM (docs/errors.md).
    """
    from stagewise.config import check_model_base, load_config
    from stagewise.errors import set_verbose

    if verbose:
        set_verbose(True)
    root = config.resolve().parent
    selected = _split(stages) or None
    # fail fast on config errors, before any engine starts (ConfigError: one line, exit 2)
    cfg = load_config(config, profile, set_ or [])
    unknown = [s for s in (selected or []) + _split(force_stage) if s not in cfg.run.stages]
    if unknown:
        typer.echo(f"error: unknown step(s) {', '.join(unknown)}; known: {', '.join(cfg.run.stages)}", err=True)
        raise typer.Exit(2)
    check_model_base(cfg.model.base, root)
    from stagewise.logs import configure

    configure(verbose)
    from stagewise.run import env_defaults

    env_defaults(root)
    from stagewise.health import check_tracking_store, check_writable

    # a read-only or full workspace, or a broken tracking store: one line now, not a hang inside Prefect
    check_writable(root, cfg.ops.min_free_mb, private=cfg.ops.private_stores)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        check_tracking_store(root / "mlflow")
    from stagewise.health import check_services

    # a tracking server or an object store that does not answer: one line now, not minutes of retries
    check_services(os.environ.get("MLFLOW_TRACKING_URI"),
                   [u for u in (cfg.ops.ray_scratch, cfg.ops.result_storage) if u and u.startswith("s3://")])
    import logging

    from stagewise.rerun import decide
    from stagewise.summary import summary_table

    # Before Prefect, torch or lm-eval are imported: an unchanged workspace answers like `dvc repro`'s
    # "up to date" (stagewise/rerun.py says what is checked), and nothing runs or is recorded.
    summary, why = decide(root, cfg, tasks.STEPS, stages=selected, force=force, force_stages=_split(force_stage))
    if summary is not None:
        logging.getLogger("stagewise").info(
            "up to date: nothing changed since run %s (DVC status clean, every stage's key matches its registered "
            "version and model folder, compression and gate inputs unchanged); the pipeline was not run — no "
            "Prefect flow run, no MLflow run; its summary follows (--force to run anyway)", summary["run_id"])
        typer.echo("\n" + summary_table(summary))
        if strict and (summary.get("gate") or {}).get("passed") is False:
            raise typer.Exit(1)
        return
    logging.getLogger("stagewise").info("running the pipeline: %s", why)
    from stagewise.errors import quiet_prefect_crashes
    from stagewise.run import local_prefect
    from stagewise.signals import stop_on_signals

    quiet_prefect_crashes()
    # what every run imports anyway, loaded while Prefect's temporary server boots
    with stop_on_signals(), local_prefect(preload=("flows.pipeline", "mlflow", "dvc.repo", "tasks.tokenizer",
                                                   "tasks.evaluate", "lm_eval")):
        from flows.pipeline import pipeline

        summary = pipeline(profile=profile, stages=selected, overrides=set_ or [], config_path=config.name,
                           workspace=str(root), force=force, force_stages=_split(force_stage))
    typer.echo("\n" + summary_table(summary))
    if strict and (summary.get("gate") or {}).get("passed") is False:
        raise typer.Exit(1)


@app.command()
def step(
    name: str = typer.Argument(..., help="A data step: " + ", ".join(s.name for s in tasks.of_kind("data")) + "."),
    config: Path = typer.Option(Path("params.resolved.yaml"), help="Resolved params (written by `stagewise run`)."),
) -> None:
    """Run one data step without Prefect (what `dvc repro` calls)."""
    from stagewise.config import ConfigError, load_config
    from stagewise.run import env_defaults
    from stagewise.steps import metrics_path
    from stagewise.workspace import Workspace

    root = config.resolve().parent
    env_defaults(root)
    try:
        cfg = load_config(config)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    ws = Workspace.at(root)
    steps = {s.name: s for s in tasks.of_kind("data")}
    if name not in steps:
        typer.echo(f"error: {name!r} is not a data step; choose from {', '.join(steps)}", err=True)
        raise typer.Exit(2)
    stats = tasks.prefect_task(name).fn(**steps[name].args(cfg, ws))
    from stagewise.dvcops import write_metrics

    write_metrics(metrics_path(ws, name), stats)


@app.command()
def profiles(config: Path = typer.Option(Path("params.yaml"), help="The params file.")) -> None:
    """List the profiles defined in params.yaml."""
    from stagewise.config import profiles_in

    for p in profiles_in(config):
        typer.echo(p)


def _mount() -> None:
    # Sub-apps live in their own modules; each keeps its heavy imports inside its commands. A broken
    # one fails here, loudly: a sub-command that vanished from --help is worse than an ImportError.
    from stagewise.cli_data import data_app
    from stagewise.cli_ops import register_commands as register_ops
    from stagewise.cli_registry import register_commands

    app.add_typer(data_app, name="data", help="Curate any JSONL/Parquet/text file outside the DAG.")
    register_commands(app)
    register_ops(app)


_mount()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
