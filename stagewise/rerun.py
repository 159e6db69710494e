"""The unchanged re-run: "nothing would change", decided before Prefect, torch or lm-eval are imported.

`dvc repro` answers an unchanged pipeline with "Data and pipelines are up to date." and does nothing.
`stagewise run` does the same (`decide`, called by the CLI before it imports the flow): when the last
run was itself fully cached — every data step current, every stage a registry hit, compression cached,
the champion where it was — and nothing it depended on moved since, running the flow again could only
reproduce that run. So it is not run: its summary is printed and the command exits as the run did.

What "nothing moved" means, checked in this order (any mismatch, or any error while checking, runs
the pipeline normally — never a cached answer that a run would not give):

- no `--force`, `--force-stage` or `--stages`; the config (params.yaml + profile + `--set`) is the
  recorded run's; not one byte of the project's Python code changed;
- under the workspace lock (a run in progress: not up to date): `dvc.lock`, `params.resolved.yaml`
  and the content hashes of `data.sources` / declared eval sets (`inputs:`) are the recorded ones, and
  DVC's own `dvc status` of every data stage is clean (DVC's answer, not a re-implementation of it);
- the starting model (`models/init`) still carries its key and weights; every training stage's cache
  key, computed by `stagewise.stage.stage_key` along the chain exactly as the flow does, finds the
  recorded registered version, and `models/<stage>/` holds that version's weights;
- the compress step's key (`stagewise.stage.compress_key`) is its cache marker, and the registered
  candidates it shipped have their weights in their folders;
- the `champion` and `challenger` aliases are where the recorded run left them (`stagewise promote`,
  `rollback` or `gate` in between change what the gate would say).

The record (`.stagewise/rerun.json`) is written at the end of a fully cached run and deleted when any
run starts (under the workspace lock), so a run that changed something, failed or was killed leaves
none. A fast answer records nothing: no Prefect flow run, no MLflow run, no new reports folder — the
summary it prints is the recorded run's (its run id, its report). docs/operations.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from stagewise.config import Config

log = logging.getLogger("stagewise")


def record_path(root: Path) -> Path:
    return Path(root) / ".stagewise" / "rerun.json"


def forget(root: Path) -> None:
    """A run starts: whatever it changes, the last record no longer describes the workspace."""
    record_path(root).unlink(missing_ok=True)


def code_fingerprint() -> str:
    """Hash of every project Python file (stagewise/, tasks/, flows/): a changed line anywhere may change
    what a run does, so the fast answer is refused (a stage's own key hashes only its import closure)."""
    from stagewise.codegraph import PACKAGES, ROOT

    h = hashlib.sha256()
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _file_sha(path: Path) -> str | None:
    from stagewise.hashing import file_hash

    return file_hash(path)[:16] if path.is_file() else None


def fully_cached(summary: dict[str, Any]) -> bool:
    """Did this run reuse everything and leave the aliases where they were?"""
    data, comp, gate = summary.get("data") or {}, summary.get("compression"), summary.get("gate") or {}
    return (not data.get("ran") and bool(summary.get("stages"))
            and all(r.get("cached") for r in summary["stages"])
            and (comp is None or bool(comp.get("cached")))
            and not gate.get("champion_moved"))


def remember(root: Path, requested: Config, resolved: Config, lineage: list, summary: dict[str, Any],
             explicit: bool) -> bool:
    """At the end of a run: write the record when the run was fully cached and ran every configured step
    (`explicit`: --stages or a force was given). Returns whether it was written."""
    from stagewise import registry

    root = Path(root)
    forget(root)
    if explicit or not lineage or requested.model.base or not fully_cached(summary):
        return False
    name, base, comp = summary["registered_model"], lineage[0], summary.get("compression")
    stages = []
    for r in summary["stages"]:
        tags = registry.version_tags(name, r["model_version"])
        hit = registry.find_cached_version(name, r["name"], tags.get("cache_key", ""))
        if hit is None or hit["version"] != r["model_version"]:
            return False   # not the version a cache lookup finds: nothing to stand on
        stages.append({"name": r["name"], "version": r["model_version"], "key": tags["cache_key"],
                       "weights_hash": tags.get("weights_hash"), "kept_parent": bool(r.get("kept_parent"))})
    shipped = [c for c in [(comp or {}).get("shipped"), *((comp or {}).get("fallbacks") or [])] if c and c.get("version")]
    champion, challenger = (summary.get("champion") or {}).get("version"), (summary.get("challenger") or {}).get("version")
    rec = {
        "run_id": summary["run_id"],
        "root": str(root.resolve()),
        "config": requested.to_dict(),
        "resolved": resolved.to_dict(),
        "code": code_fingerprint(),
        "dvc_lock": _file_sha(root / "dvc.lock"),
        "params_resolved": _file_sha(root / "params.resolved.yaml"),
        "inputs": (summary.get("data") or {}).get("inputs"),
        "base": {"stage": base.stage, "key": base.cache_key, "weights_hash": base.weights_hash},
        "stages": stages,
        "compress": None if comp is None else {
            "key": (root / "models" / "compress" / "cache_key").read_text(),
            "versions": [{"version": c["version"], "model_dir": _relative(c.get("model_dir"), root),
                          "weights_hash": registry.version_tags(name, c["version"]).get("weights_hash")}
                         for c in shipped]},
        "champion": champion,
        "champion_weights": registry.version_tags(name, champion).get("weights_hash") if champion else None,
        "challenger": challenger,
        # the local store's bytes after this run: unchanged bytes = the same versions, tags and aliases
        "store": None if registry._USER_TRACKING_URI else _store_sha(root),
    }
    path = record_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(path)
    return True


def _store_sha(root: Path) -> str | None:
    """The workspace's MLflow store (SQLite, with its write-ahead log when there is one), byte for byte."""
    h = hashlib.sha256()
    for f in ("mlflow.db", "mlflow.db-wal"):
        p = root / "mlflow" / f
        if p.is_file():
            h.update(f.encode())
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _relative(path: str | None, root: Path) -> str | None:
    """A folder inside the workspace, relative to it (a copied or moved workspace checks its own)."""
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return None   # outside the workspace: not checked, so not up to date (below)


class _Stale(Exception):
    """Something a run depends on moved: the reason, for the log line."""


def decide(root: Path, cfg: Config, steps: tuple, stages: list[str] | None = None, force: bool = False,
           force_stages: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any] | None, str]:
    """(the recorded run's summary, why) when a run would change nothing; (None, why not) otherwise.

    `cfg`: the config as requested (params.yaml + profile + --set); `steps`: the step registry
    (`tasks.STEPS`). Never raises: a check that fails for any reason answers "run it".
    """
    try:
        return _decide(Path(root), cfg, steps, stages, force, list(force_stages)), ""
    except _Stale as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a failed check is a reason to run, not an error
        return None, f"could not check ({type(e).__name__}: {e})"


def _decide(root: Path, cfg: Config, steps: tuple, stages, force: bool, force_stages: list[str]) -> dict[str, Any]:
    if force or force_stages:
        raise _Stale("--force" + ("" if force else "-stage " + ",".join(force_stages)))
    if stages:
        raise _Stale("--stages given")
    path = record_path(root)
    if not path.is_file():
        raise _Stale("no fully cached run recorded since the workspace last changed")
    rec = json.loads(path.read_text())
    run_id = rec["run_id"]
    if rec["config"] != cfg.to_dict():
        changed = sorted(k for k in set(rec["config"]) | set(cfg.to_dict())
                         if rec["config"].get(k) != cfg.to_dict().get(k))
        raise _Stale(f"settings changed since run {run_id}: {', '.join(changed)}")
    if rec["code"] != code_fingerprint():
        raise _Stale(f"the project's code changed since run {run_id}")
    summary_file = root / "reports" / run_id / "summary.json"
    latest = root / "reports" / "latest" / "summary.json"
    if not summary_file.is_file() or not latest.is_file() or json.loads(latest.read_text()).get("run_id") != run_id:
        raise _Stale(f"reports/{run_id}/ or reports/latest/ is not that run's any more")

    from stagewise.lock import WorkspaceLocked, workspace_lock

    try:
        with workspace_lock(root, timeout=0, run="up-to-date check"):
            _check_workspace(root, cfg, steps, rec)
    except WorkspaceLocked:
        raise _Stale("another run holds the workspace") from None
    return json.loads(summary_file.read_text())


def _check_workspace(root: Path, cfg: Config, steps: tuple, rec: dict[str, Any]) -> None:
    from stagewise import dvcops
    from stagewise.hashing import dir_hash, dvc_out_hash, input_hashes, training_data_hash
    from stagewise.stage import Lineage, compress_key, init_key, stage_key
    from stagewise.workspace import Workspace

    ws = Workspace.at(root)
    run_id = rec["run_id"]
    for name, path in (("dvc_lock", root / "dvc.lock"), ("params_resolved", ws.resolved_params)):
        if _file_sha(path) != rec[name]:
            raise _Stale(f"{path.name} changed since run {run_id}")
    if input_hashes(cfg, root) != rec["inputs"]:
        raise _Stale("a data.sources file or declared eval set changed")
    stale = dvcops.stale_stages(root)
    if stale:
        raise _Stale(f"dvc status: {', '.join(sorted(stale))} not up to date")

    # The chain as the train phase builds it (flows/pipeline.py): the same keys, the same registry lookups.
    resolved = Config.model_validate(rec["resolved"])
    by_name = {s.name: s for s in steps}
    # what the flow passes the stages: training_data_hash of the data steps' dvc.lock md5s (the two it reads)
    data_hash = training_data_hash({s: dvc_out_hash(root, s) for s in ("decontaminate", "raft")})
    init_dir = ws.model_dir("init")
    key = init_key(cfg, dvc_out_hash(root, "tokenizer"))
    marker = init_dir / "cache_key"
    if (rec["base"]["stage"] != "init" or key != rec["base"]["key"] or not marker.is_file()
            or marker.read_text() != key or dir_hash(init_dir, "*.safetensors") != rec["base"]["weights_hash"]):
        raise _Stale("models/init is not the recorded starting model")
    parent = Lineage("init", str(init_dir), key, weights_hash=rec["base"]["weights_hash"])

    selected = list(cfg.run.stages)
    train = [s.name for s in steps if s.kind == "train"]
    last = max((train.index(s) for s in selected if s in train), default=-1)
    if [r["name"] for r in rec["stages"]] != train[: last + 1]:
        raise _Stale("the recorded run trained other stages")
    lineage = [parent]
    for row in rec["stages"]:
        stage = row["name"]
        key = stage_key(by_name[stage], resolved, parent, data_hash)
        if key != row["key"]:
            raise _Stale(f"{stage}: its cache key is not that of run {run_id}'s v{row['version']}")
        folder = ws.model_dir(stage)
        if not folder.is_dir() or dir_hash(folder, "*.safetensors") != row["weights_hash"]:
            raise _Stale(f"models/{stage} is missing or does not hold version {row['version']}'s weights")
        if not row["kept_parent"]:
            parent = Lineage(stage, str(folder), key, row["version"], data_hash, weights_hash=row["weights_hash"])
            lineage.append(parent)

    candidate = len(lineage) > 1
    if "compress" in selected and resolved.compress.methods and candidate:
        from stagewise.evalsets import plan

        key = compress_key(by_name["compress"], resolved, parent, plan(resolved, root).describe())
        marker = ws.model_dir("compress") / "cache_key"
        if (rec["compress"] is None or rec["compress"]["key"] != key or not marker.is_file()
                or marker.read_text() != key or not (ws.model_dir("compress") / "compress.json").is_file()):
            raise _Stale("the compress step's inputs changed")
        for c in rec["compress"]["versions"]:
            folder = root / c["model_dir"] if c.get("model_dir") else None
            if folder is None or not folder.is_dir() or dir_hash(folder, "*.safetensors") != c["weights_hash"]:
                raise _Stale(f"the folder of compressed model version {c['version']} is missing or changed")
    elif rec["compress"] is not None:
        raise _Stale("compression would not run now")
    if rec["champion"] is not None and rec["champion"] != rec["challenger"]:
        folder = ws.model_dir("champion")   # the gate scores the champion from here
        if not folder.is_dir() or dir_hash(folder, "*.safetensors") != rec["champion_weights"]:
            raise _Stale("models/champion is missing or changed")
    _check_registry(root, cfg, rec)


def _check_registry(root: Path, cfg: Config, rec: dict[str, Any]) -> None:
    """The registry holds what the record says: the same versions under the same keys, the same aliases.

    The workspace's own SQLite store is compared byte for byte with its state at the end of the recorded
    run (any write since — a version, a tag, an alias, a run — is a change; importing MLflow costs
    seconds). A store the user points MLFLOW_TRACKING_URI at is asked through MLflow's client."""
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        if rec["root"] != str(root.resolve()):
            raise _Stale(f"the workspace moved from {rec['root']} (its MLflow store is re-rooted by a run)")
        if rec["store"] is None or _store_sha(root) != rec["store"]:
            raise _Stale(f"the MLflow store changed since run {rec['run_id']}")
        return
    from stagewise import registry

    registry.setup_tracking(root, private=cfg.ops.private_stores)
    name = rec["resolved"]["run"]["registered_model"]
    for row in rec["stages"]:
        hit = registry.find_cached_version(name, row["name"], row["key"])
        if hit is None or hit["version"] != row["version"] or hit["tags"].get("weights_hash") != row["weights_hash"]:
            raise _Stale(f"{row['name']}: its cache key matches no registered version (or another one than "
                         f"v{row['version']})")
    for c in (rec["compress"] or {}).get("versions", []):
        if registry.version_tags(name, c["version"]).get("weights_hash") != c["weights_hash"]:
            raise _Stale(f"compressed model version {c['version']} changed in the registry")
    if (registry.alias_version(name, registry.CHAMPION) != rec["champion"]
            or registry.alias_version(name, registry.CHALLENGER) != rec["challenger"]):
        raise _Stale(f"the champion/challenger aliases moved since run {rec['run_id']}")
