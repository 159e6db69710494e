"""`stagewise serve`: the pipeline as a scheduled Prefect deployment (mounted by stagewise/cli.py).

    prefect server start &                                   # once; the UI is at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    stagewise serve --cron "0 3 * * *" --profile demo        # blocks; runs the flow on schedule

`flow.serve` keeps a long-lived process that polls the server and runs each scheduled (or manually
triggered) flow run in a subprocess. For work pools (process → Docker → Kubernetes workers) the same
deployment is declared in prefect.yaml: `prefect deploy --all`. See docs/operations.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer


def deployment_parameters(root: Path, config: Path, profile: str, overrides: list[str],
                          stages: list[str] | None) -> dict:
    """The pipeline flow's parameters for a deployment: an absolute workspace, so any cwd works."""
    return {"profile": profile, "stages": stages, "overrides": overrides, "config_path": config.name,
            "workspace": str(root)}


def register_commands(app: typer.Typer) -> None:
    @app.command()
    def serve(
        cron: str = typer.Option(..., help='Schedule, cron syntax, e.g. "0 3 * * *" (03:00 daily).'),
        timezone: str = typer.Option("UTC", help="Time zone the cron schedule is read in."),
        name: str = typer.Option("scheduled", help="Deployment name (the flow is `stagewise`)."),
        profile: str = typer.Option("demo", help="Profile from params.yaml `profiles:`."),
        stages: Optional[list[str]] = typer.Option(None, help="Comma-separated steps to run (default: all)."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Override, e.g. --set sft.epochs=2 (repeatable)."),
        config: Path = typer.Option(Path("params.yaml"), help="The params file (its folder is the workspace)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="Library logs too."),
    ) -> None:
        """Serve the pipeline as a Prefect deployment on a cron schedule (blocks; Ctrl-C stops and pauses it)."""
        from stagewise.cli_common import split_names as _split
        from stagewise.config import ConfigError, load_config

        root = config.resolve().parent
        try:  # fail before registering anything that could never run
            cfg = load_config(config, profile, set_ or [])
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        selected = _split(stages) or None
        unknown = [s for s in selected or [] if s not in cfg.run.stages]
        if unknown:
            typer.echo(f"error: unknown step(s) {', '.join(unknown)}; known: {', '.join(cfg.run.stages)}", err=True)
            raise typer.Exit(2)
        from prefect.schedules import Cron, validate_cron_string

        try:
            validate_cron_string(cron)
        except ValueError as e:
            typer.echo(f'error: --cron {cron!r} is not a cron expression ({e}); e.g. --cron "0 3 * * *"', err=True)
            raise typer.Exit(2)
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            typer.echo(f"error: --timezone {timezone!r} is not an IANA time zone; e.g. --timezone UTC or "
                       "--timezone Europe/Berlin", err=True)
            raise typer.Exit(2)

        from stagewise.logs import configure
        from stagewise.run import env_defaults

        configure(verbose)
        env_defaults(root)
        if not os.environ.get("PREFECT_API_URL"):
            typer.echo("warning: PREFECT_API_URL is not set: schedules live only as long as this process's "
                       "temporary server. Start `prefect server start` and export "
                       "PREFECT_API_URL=http://127.0.0.1:4200/api for a persistent one.", err=True)
        import flows
        from prefect import flow

        # Served from source, so each run loads `flows/pipeline.py` by entrypoint in a fresh process.
        # (A flow object served directly is cloudpickled with this project's modules *by value*: the
        # subflows then lose the globals that resolve their annotations, and every run fails.)
        # The source is the workspace: runs start in it, like `stagewise run` (DVC resolves from the cwd).
        flow_file = Path(flows.__file__).resolve().parent / "pipeline.py"
        pipeline = flow.from_source(source=str(root), entrypoint=f"{os.path.relpath(flow_file, root)}:pipeline")
        pipeline.serve(
            name=name,
            schedules=[Cron(cron, timezone=timezone)],
            parameters=deployment_parameters(root, config, profile, set_ or [], selected),
            tags=["stagewise", f"profile:{profile}"],
            description=f"Stagewise pipeline, profile {profile}, workspace {root}",
            limit=1,          # one run at a time from this server (the workspace lock would queue more)
            global_limit=1,
        )
