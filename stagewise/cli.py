"""`stagewise` command line. Heavy libraries are imported inside commands: `--help` stays instant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

import tasks
from stagewise.cli_common import split_names as _split

STEPS_HELP = ("Steps (module tasks/<step>.py = DVC stage = params section = MLflow run = Prefect task):\n"
              + "; ".join(f"{kind}: " + ", ".join(s.name for s in tasks.of_kind(kind)) for kind in ("data", "train", "ship"))
              + ".")

app = typer.Typer(
    help=f"Stagewise: one Prefect DAG from raw text to a promoted model.\n\n{STEPS_HELP}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    profile: str = typer.Option("demo", help="Profile from params.yaml `profiles:` (smoke, demo)."),
    stages: Optional[list[str]] = typer.Option(None, help="Comma-separated steps to run (default: all)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override, e.g. --set sft.epochs=2 (repeatable)."),
    config: Path = typer.Option(Path("params.yaml"), help="The params file (its folder is the workspace)."),
    force: bool = typer.Option(False, help="Re-run every step, ignoring caches."),
    force_stage: Optional[list[str]] = typer.Option(None, help="Re-run this step, and every stage trained on top of it (repeatable / comma-separated)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Library logs too."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when the gate fails (for CI and schedulers)."),
) -> None:
    """Run the pipeline end to end and print the summary table.

    Exit codes: 0 done (the gate verdict is in the table and summary.json), 1 gate failed with --strict,
    2 bad config or arguments, 3 workspace locked by another run.
    """
    from stagewise.config import ConfigError, load_config

    root = config.resolve().parent
    selected = _split(stages) or None
    try:  # fail fast on config errors, before any engine starts
        cfg = load_config(config, profile, set_ or [])
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    unknown = [s for s in (selected or []) + _split(force_stage) if s not in cfg.run.stages]
    if unknown:
        typer.echo(f"error: unknown step(s) {', '.join(unknown)}; known: {', '.join(cfg.run.stages)}", err=True)
        raise typer.Exit(2)
    from stagewise.logs import configure

    configure(verbose)
    from stagewise.run import env_defaults

    env_defaults(root)
    from stagewise.lock import WorkspaceLocked
    from stagewise.run import local_prefect
    from stagewise.summary import summary_table

    try:
        # what every run imports anyway, loaded while Prefect's temporary server boots
        with local_prefect(preload=("flows.pipeline", "mlflow", "dvc.repo", "tasks.tokenizer", "tasks.evaluate",
                                    "lm_eval")):
            from flows.pipeline import pipeline

            summary = pipeline(profile=profile, stages=selected, overrides=set_ or [], config_path=config.name,
                               workspace=str(root), force=force, force_stages=_split(force_stage))
    except WorkspaceLocked as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3)
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
def profiles(config: Path = typer.Option(Path("params.yaml"))) -> None:
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
