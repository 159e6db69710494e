"""`stagewise registry | promote | rollback | gate`: the model registry from the command line.

Mounted by stagewise/cli.py (`register_commands(app)`); every heavy import happens inside a command.

    stagewise registry                                   # versions, stages, aliases, gate verdicts
    stagewise gate --candidate models:/stagewise/5       # exit 0 pass, 1 fail, 2 error
    stagewise gate --candidate ./my-model --baseline models:/stagewise@champion
    stagewise promote --version 5                        # refuses unless version 5 passed its gate
    stagewise promote --version 4 --force --reason "hotfix approved by on-call"
    stagewise rollback                                   # champion ← previous-champion
    stagewise download models:/stagewise@champion champion   # a version as a plain HF folder

Model URIs: `models:/<name>/<version>`, `models:/<name>@<alias>`, or a local HF model folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from stagewise.errors import UserError

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class CliError(UserError):
    """A problem the user can fix: printed without a traceback, exit code 2."""


def _setup(config: Path, profile: Optional[str], set_: Optional[list[str]]):
    from stagewise import registry
    from stagewise.config import ConfigError, load_config
    from stagewise.run import env_defaults

    root = config.resolve().parent
    env_defaults(root)
    try:
        cfg = load_config(config, profile, set_ or [])
    except ConfigError as e:
        raise CliError(str(e)) from None
    registry.setup_tracking(root)
    return root, cfg


def resolve(uri: str, dest_root: Path) -> tuple[Path, dict]:
    """A model URI or folder → (local HF folder, info {name, version, stage, parent_version})."""
    from stagewise import registry

    m = _URI.match(uri)
    if m is None:
        folder = Path(uri)
        if not (folder / "config.json").exists():
            raise CliError(f"{uri}: neither a model URI (models:/<name>/<version>, models:/<name>@<alias>) "
                           "nor a model folder with config.json")
        return folder.resolve(), {"uri": uri}
    name, version = m["name"], m["version"]
    if version is None:
        version = registry.alias_version(name, m["alias"])
        if version is None:
            raise CliError(f"{uri}: registered model {name!r} has no alias {m['alias']!r} "
                           "(see `stagewise registry`)")
    try:
        tags = registry.version_tags(name, version)
    except Exception:
        raise CliError(f"{uri}: no version {version} of registered model {name!r} (see `stagewise registry`)") from None
    folder = dest_root / f"{name}-v{version}"
    if not (folder / "config.json").exists():
        registry.download_model(name, version, folder)
    parent = tags.get("parent_version")
    return folder, {"uri": uri, "name": name, "version": str(version), "stage": tags.get("stage"),
                    "parent_version": None if parent in (None, "", "none") else parent,
                    "parent_stage": tags.get("parent_stage")}


def _chain(name: str, version: str | None, cache: Path) -> list[tuple[Path, dict]]:
    """The registered ancestors of a version, nearest first: [(folder, info), …] up to the first
    fine-tuned model (whose parent is unregistered: model.base or the random init)."""
    out, seen = [], set()
    while version and version not in seen:
        seen.add(version)
        folder, info = resolve(f"models:/{name}/{version}", cache)
        out.append((folder, info))
        version = info.get("parent_version")
    return out


def run_gate(root: Path, cfg, candidate: str, baseline: Optional[str], stage: Optional[str]) -> tuple[dict, dict]:
    """Evaluate the candidate and whom it is compared with, and apply the pipeline's own rulebook:
    target vs its parent, general rules vs the parent, the fine-tuning base and the baseline (default:
    the champion), the earlier stages' targets, compression cost vs the uncompressed model. The
    version is tagged `gate=passed` only when every rule, the base's included, could be checked."""
    from stagewise import registry
    from stagewise.workspace import Workspace
    import functools

    from stagewise.evalsets import plan
    from stagewise.rulebook import Guard, Rulebook
    from stagewise.stage import eval_tasks_dir
    from stagewise.evaluation import evaluate

    ws = Workspace.at(root)
    cache = ws.root / "models" / "_registry"
    cand_dir, cand = resolve(candidate, cache)
    uncompressed_dir, unc = None, {}
    if cand.get("stage") == "compress" and cand.get("parent_version"):
        # A compressed version is judged like the pipeline's gate judges it: on its uncompressed
        # model's target vs that model's parent, and against the uncompressed model itself.
        uncompressed_dir, unc = resolve(f"models:/{cand['name']}/{cand['parent_version']}", cache)
        stage = stage or cand.get("parent_stage") or unc.get("stage")
        cand = cand | {"parent_version": unc.get("parent_version")}
    stage = stage or cand.get("stage")
    evals = plan(cfg, ws.root)
    tasks = evals.stage_tasks(stage) if stage in evals.targets else evals.task_names()
    evaluate = functools.partial(evaluate, tasks_dir=eval_tasks_dir(cfg, ws.root))

    name = cand.get("name") or cfg.run.registered_model
    if baseline is None and registry.alias_version(name, registry.CHAMPION) is not None:
        baseline = f"models:/{name}@{registry.CHAMPION}"
    base_dir, base = resolve(baseline, cache) if baseline else (None, {})
    chain = _chain(name, cand.get("parent_version"), cache) if cand.get("version") else []
    parent_dir = chain[0][0] if chain else None
    if not chain and cand.get("version") and cand.get("stage") != "pretrain" \
            and (ws.model_dir("init") / "config.json").exists():
        parent_dir = ws.model_dir("init")   # the first stage trained from the starting model (model.base or init)
    if parent_dir is None and base_dir is None:
        raise CliError(f"{candidate}: nothing to compare with — it has no registered parent and there is no "
                       "champion; pass --baseline <model uri>")

    scores = {"candidate": evaluate(cand_dir, tasks, ws, cfg.evaluate)}
    if uncompressed_dir is not None:
        scores["uncompressed"] = evaluate(uncompressed_dir, tasks, ws, cfg.evaluate)
    if parent_dir is not None:
        scores["parent"] = evaluate(parent_dir, tasks, ws, cfg.evaluate)
    if base_dir is not None and base_dir != cand_dir and base_dir != parent_dir:
        scores["baseline"] = evaluate(base_dir, tasks, ws, cfg.evaluate)
    # Where fine-tuning started, as the pipeline's gate sees it: the nearest registered pretrain ancestor, or
    # the workspace's starting model (models/init: model.base converted, or the random init).
    pre = next(((folder, info) for folder, info in chain if info.get("stage") == "pretrain"), None)
    fine_tuned = any(info.get("stage") not in ("pretrain", "compress") for _, info in chain)
    fine_tuning_dir, fine_tuning = None, None
    if pre:
        fine_tuning_dir, fine_tuning = pre[0], f"v{pre[1]['version']} (pretrain)"
    elif (ws.model_dir("init") / "config.json").exists():
        fine_tuning_dir, fine_tuning = ws.model_dir("init"), str(ws.model_dir("init"))
    base_checked = fine_tuning_dir is not None
    base_scores = None
    if fine_tuning_dir is not None and fine_tuning_dir not in (parent_dir, cand_dir) and fine_tuned:
        base_scores = evaluate(fine_tuning_dir, [g.task for g in evals.general], ws, cfg.evaluate)
    # Earlier stages' targets, each vs the ancestor that reached it.
    book = Rulebook.of(cfg, evals)
    guards = []
    for folder, info in chain:
        t = evals.targets.get(info.get("stage") or "")
        if t is None or info.get("stage") == stage or not book.gate.guard_earlier_targets:
            continue
        if t.label in {g.label for g in evals.general} or any(g.stage == info["stage"] for g in guards):
            continue
        guards.append(Guard(info["stage"], info.get("version"), evaluate(folder, [t.task], ws, cfg.evaluate)))
    # No registered parent: the baseline plays the parent (its target must be beaten too).
    parent = scores.get("parent", scores.get("baseline"))
    champion = scores.get("baseline") if "parent" in scores else None
    result = book.judge(stage or "", scores["candidate"], parent=parent, base=base_scores, champion=champion,
                        uncompressed=scores.get("uncompressed"), guards=guards)
    if not base_checked and "base" in cfg.gate.against:
        result.reasons.append("the fine-tuning base could not be found (no registered pretrain model and no "
                              f"{ws.model_dir('init')}): the base rules were not checked, so the version is not "
                              "tagged gate=passed")
    if cand.get("version") and (base_checked or not result.passed or "base" not in cfg.gate.against):
        registry.client().set_model_version_tag(cand["name"], cand["version"], "gate",
                                                "passed" if result.passed else "failed")
    info = {"candidate": cand, "stage": stage, "baseline": base or None, "fine_tuning_base": fine_tuning,
            "parent": cand.get("parent_version"), "uncompressed": unc.get("version"), "tasks": tasks}
    return result.to_dict(), info


def _config() -> Path:
    return typer.Option(Path("params.yaml"), help="The params file (its folder is the workspace).")


def _profile() -> Optional[str]:
    return typer.Option(None, help="Profile from params.yaml `profiles:`.")


def _set() -> Optional[list[str]]:
    return typer.Option(None, "--set", help="Override, e.g. --set gate.general_max_drop_points=5 (repeatable).")


def _name() -> Optional[str]:
    return typer.Option(None, help="Registered model (default: run.registered_model).")


def _rule_line(r: dict) -> str:
    if r["delta"] is None:
        return f"  FAIL {r['rule']:<17} {r['metric']}: not evaluated on the candidate"
    from stagewise.rulebook import fmt_delta

    ci = "" if r["ci_low"] is None else f", CI [{fmt_delta(r['ci_low'], r['unit'])}, {fmt_delta(r['ci_high'], r['unit'])}]"
    flip = " (could flip: noise)" if r["flips_within_ci"] else ""
    return (f"  {'PASS' if r['passed'] else 'FAIL'} {r['rule']:<17} {r['metric']:<32} vs {r['against']:<8} "
            f"{r['baseline']:.4g} → {r['candidate']:.4g} ({fmt_delta(r['delta'], r['unit'])}{ci}){flip}")


def register_commands(app: typer.Typer) -> None:
    @app.command("registry")
    def registry_cmd(config: Path = _config(), profile: Optional[str] = _profile(),
                     set_: Optional[list[str]] = _set(),
                     name: Optional[str] = _name(),
                     as_json: bool = typer.Option(False, "--json", metavar="", help="Machine-readable output.")) -> None:
        """List registered versions: stage, parent, aliases, gate verdict."""
        try:
            _, cfg = _setup(config, profile, set_)
            from stagewise import registry

            name = registry.check_name(name or cfg.run.registered_model)
            c = registry.client()
            versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
            # search results carry no aliases in MLflow 3: read them from the registered model
            by_version: dict[str, list[str]] = {}
            if versions:
                for alias, ver in (c.get_registered_model(name).aliases or {}).items():
                    by_version.setdefault(str(ver), []).append(alias)
        except CliError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        rows = []
        here = None
        for v in versions:
            aliases = sorted(by_version.get(str(v.version), []))
            rows.append({"version": str(v.version), "stage": v.tags.get("stage", ""),
                         "parent": v.tags.get("parent_version", ""), "aliases": aliases,
                         "gate": v.tags.get("gate", ""), "forced": v.tags.get("forced") == "true",
                         "forced_reason": v.tags.get("forced_reason", ""),
                         "pipeline_run": v.tags.get("pipeline_run", "")})
            if v.tags.get("speed_ratio") not in (None, "", "None"):
                # a compressed version's speed vs its parent is a fact of the machine it was measured on
                from stagewise import machine

                here = here or machine.describe()
                rows[-1].update(speed_ratio=float(v.tags["speed_ratio"]),
                                speed_machine=v.tags.get("speed_machine", ""),
                                speed_elsewhere=machine.elsewhere(v.tags.get("speed_machine_kind"), here))
        if as_json:
            typer.echo(json.dumps({"name": name, "versions": rows}, indent=1))
            return
        if not rows:
            if name != cfg.run.registered_model:   # a --name that names nothing is a typo, not an empty store
                known = sorted(m.name for m in c.search_registered_models())
                typer.echo(f"error: no registered model {name!r} in this store (known: "
                           f"{', '.join(known) or 'none'}) — check --name", err=True)
                raise typer.Exit(2)
            typer.echo(f"no versions of {name!r} yet (run `stagewise run`)")
            return
        typer.echo(f"{'version':>7}  {'stage':<10} {'parent':>6}  {'gate':<7} aliases")
        for r in rows:
            extra = f"  (forced: {r['forced_reason']})" if r["forced_reason"] else ""
            if "speed_ratio" in r:
                extra += f"  speed {r['speed_ratio']:.2f}x the parent's" + (
                    f", measured on another machine kind: {r['speed_machine'] or 'unrecorded'}"
                    if r["speed_elsewhere"] else "")
            typer.echo(f"{r['version']:>7}  {r['stage']:<10} {r['parent']:>6}  {r['gate'] or '-':<7} "
                       f"{', '.join(r['aliases'])}{extra}")

    @app.command()
    def download(uri: str = typer.Argument(..., help="models:/<name>/<version> or models:/<name>@<alias>."),
                 dest: Path = typer.Argument(..., help="The folder to write (replaced if it exists)."),
                 config: Path = _config()) -> None:
        """Write a registered version as a plain HF folder (safetensors + tokenizer), NF4/int8 included."""
        try:
            _setup(config, None, None)
            from stagewise import registry

            m = _URI.match(uri)
            if m is None:
                raise CliError(f"{uri}: not a model URI (models:/<name>/<version> or models:/<name>@<alias>)")
            name, version = m["name"], m["version"] or registry.alias_version(m["name"], m["alias"])
            if version is None:
                raise CliError(f"{uri}: registered model {name!r} has no alias {m['alias']!r} "
                               "(see `stagewise registry`)")
            try:
                registry.version_tags(name, version)
            except Exception:
                raise CliError(f"{uri}: no version {version} of registered model {name!r} "
                               "(see `stagewise registry`)") from None
            registry.download_model(name, version, dest)
        except CliError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        typer.echo(f"{dest}: {name} v{version} (model + tokenizer)")

    @app.command()
    def promote(version: str = typer.Option(..., help="The registered version to make champion."),
                force: bool = typer.Option(False, metavar="", help="Promote even though its gate did not pass."),
                reason: Optional[str] = typer.Option(None, help="Required with --force; recorded as a tag."),
                config: Path = _config(), profile: Optional[str] = _profile(),
                set_: Optional[list[str]] = _set(),
                name: Optional[str] = _name()) -> None:
        """Make a version champion; refuses one whose gate did not pass unless --force --reason "..."."""
        try:
            if force and not (reason or "").strip():
                raise CliError('--force needs --reason "why" (it is recorded on the version)')
            _, cfg = _setup(config, profile, set_)
            from stagewise import registry

            name = registry.check_name(name or cfg.run.registered_model)
            if not version.isdigit():
                raise CliError(f"--version {version!r}: a version number, e.g. --version 3 (see `stagewise registry`)")
            try:
                tags = registry.version_tags(name, version)
            except Exception:
                raise CliError(f"no version {version} of registered model {name!r} (see `stagewise registry`)") from None
            verdict = tags.get("gate")
            if verdict != "passed" and not force:
                why = {"failed": "its gate failed", None: "it was never gated", "forced": "it was only force-promoted"}
                typer.echo(f"refused: version {version} not promoted because {why.get(verdict, f'gate={verdict}')}. "
                           f"Run `stagewise gate --candidate models:/{name}/{version}`, or override with "
                           '--force --reason "..."', err=True)
                raise typer.Exit(1)
            # under the registry lock: what `seen` says is the champion this promotion replaced, even
            # when another promote ran a moment earlier
            _, seen = registry.promote_seen(name, version, gate_passed=verdict == "passed",
                                            force_reason=reason if force and verdict != "passed" else None)
        except CliError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        was = ("already champion" if seen == str(version) else
               f"was v{seen}, now previous-champion" if seen else "no champion before")
        typer.echo(f"champion: {name} v{version} ({was})"
                   + (" — forced; its gate verdict stays failed" if force and verdict == "failed" else
                      " — forced" if force and verdict != "passed" else ""))

    @app.command()
    def rollback(config: Path = _config(), profile: Optional[str] = _profile(),
                 set_: Optional[list[str]] = _set(),
                 name: Optional[str] = _name()) -> None:
        """Champion back to the previous champion (the two swap, so a second rollback undoes it)."""
        try:
            _, cfg = _setup(config, profile, set_)
            from stagewise import registry

            name = registry.check_name(name or cfg.run.registered_model)
            try:
                now = registry.rollback(name)
            except RuntimeError as e:
                raise CliError(str(e)) from None
        except CliError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        typer.echo(f"champion: {name} v{now}")

    @app.command("gate")
    def gate_cmd(candidate: str = typer.Option(..., help="models:/<name>/<version>, models:/<name>@<alias> or a folder."),
                 baseline: Optional[str] = typer.Option(None, help="Compare with this model (default: the champion)."),
                 stage: Optional[str] = typer.Option(None, help="Whose target must improve (default: the version's "
                                                                 "`stage` tag)."),
                 config: Path = _config(), profile: Optional[str] = _profile(),
                 set_: Optional[list[str]] = _set(),
                 as_json: bool = typer.Option(False, "--json", metavar="", help="Print the full gate result as JSON.")) -> None:
        """Forgetting guard on a model: exit 0 pass, 1 fail, 2 error."""
        try:
            root, cfg = _setup(config, profile, set_)
            result, info = run_gate(root, cfg, candidate, baseline, stage)
        except CliError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except typer.Exit:
            raise
        except Exception as e:  # an evaluation that cannot run is an error, not a verdict
            typer.echo(f"error: {type(e).__name__}: {e}", err=True)
            raise typer.Exit(2)
        if as_json:
            typer.echo(json.dumps({"gate": result, **info}, indent=1, default=str))
        else:
            typer.echo(f"gate: {'PASSED' if result['passed'] else 'FAILED'} — {candidate}")
            for r in result["rules"]:
                typer.echo(_rule_line(r))
            for reason in result["reasons"]:
                typer.echo(f"  - {reason}")
        raise typer.Exit(0 if result["passed"] else 1)
