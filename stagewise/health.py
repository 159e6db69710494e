"""Workspace and store health, checked before anything starts (no Prefect server, no MLflow store).

- The workspace and its stores must be writable and have room: a read-only or full workspace used
  to hang a run for minutes inside Prefect and MLflow; it is now one line, exit 3.
- The local MLflow store (`mlflow/mlflow.db`) must be an intact SQLite database. A missing one next
  to existing artifacts is an error, never a silently created empty store (whose registry "has no
  versions yet" while the models' files are still on disk).
- The stores (`mlflow/`, `reports/`, `.prefect/`) are private to the user: folders 0700, the
  tracking database 0600 (`ops.private_stores: false` leaves them to the umask). Run reports and
  tracking data can hold paths, parameters and — in other people's setups — credentials.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from stagewise.errors import StoreError

STORES = ("mlflow", "reports", ".prefect", ".stagewise")
_MOVE_ASIDE = "mv mlflow mlflow.broken-$(date +%s)"


def private_dir(path: Path, private: bool = True) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path, 0o700)
    return path


def check_writable(root: Path, min_free_mb: float = 0, private: bool = True) -> None:
    """Each store folder can be created and written; the disk has `min_free_mb` free (0: no check)."""
    root = Path(root)
    for name in ("", *STORES):
        folder = root / name
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            if name:
                private_dir(folder, private and name != ".stagewise")
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StoreError(f"{folder}: not writable ({e.strerror}) — the workspace must be writable: fix its "
                             "permissions or free space, or run from a writable copy") from None
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
    if min_free_mb:
        free = shutil.disk_usage(root).free / 2**20
        if free < min_free_mb:
            raise StoreError(f"{root}: only {free:.0f} MB free, the run needs at least {min_free_mb:.0f} MB "
                             "(ops.min_free_mb) — free space, or lower ops.min_free_mb if you know it fits")


def check_tracking_store(store: Path) -> None:
    """`store`/mlflow.db is intact, or absent in a store that never held anything."""
    store = Path(store)
    db = store / "mlflow.db"
    if not db.exists():
        artifacts = store / "artifacts"
        held = artifacts.is_dir() and any(p.is_file() for p in artifacts.rglob("*"))
        if held:
            raise StoreError(f"{db}: the tracking database is missing but {artifacts} still holds logged "
                             "models — restore mlflow.db from a backup; or, to start an empty registry, "
                             f"move the old store aside first ({_MOVE_ASIDE})")
        return
    problem = _sqlite_problem(db)
    if problem:
        raise StoreError(f"{db}: not a usable MLflow store ({problem}) — restore it from a backup, or move "
                         f"the store aside to start an empty one ({_MOVE_ASIDE})")


def _sqlite_problem(db: Path) -> str | None:
    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except OSError as e:
        return e.strerror
    if db.stat().st_size == 0:
        return None  # SQLite creates an empty file first; MLflow initialises it
    if header != b"SQLite format 3\x00":
        return "not an SQLite database"
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                return f"corrupt: {ok}"
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return f"corrupt: {e}"
    if tables and "alembic_version" not in tables:
        return "an SQLite database, but not MLflow's"
    return None


def private_file(path: Path, private: bool = True) -> None:
    if private and Path(path).exists():
        os.chmod(path, 0o600)


# ---------------------------------------------------------------- shared services (docs/scale-out.md)
def check_services(tracking_uri: str | None, s3_uris: list[str], timeout: float = 10.0) -> None:
    """An MLflow tracking server (http(s) MLFLOW_TRACKING_URI) answers `/health`, and the S3 endpoint
    behind every `s3://` store holds its bucket: otherwise one line naming the address (credentials
    masked), exit 3, within seconds — MLflow's and botocore's own retries take minutes to give up."""
    from stagewise.redact import redact

    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        import urllib.request

        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - the user's own server
                ok = r.status == 200
        except Exception as e:  # noqa: BLE001 - refused, timed out, DNS, HTTP error: all one message
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "" if ok else f"HTTP {r.status}"
        if not ok:
            raise StoreError(f"MLflow tracking server {redact(tracking_uri)} is unreachable ({redact(why)[:200]}) — "
                             "start it, or fix MLFLOW_TRACKING_URI")
    for uri in s3_uris:
        problem = _s3_problem(uri, timeout)
        if problem:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
            raise StoreError(f"S3 store {redact(uri)} at {redact(endpoint)} is not usable ({redact(problem)[:200]}) — "
                             "start the object store, or fix AWS_ENDPOINT_URL / the credentials / the bucket")


def _s3_problem(uri: str, timeout: float) -> str | None:
    try:
        import boto3
        import s3fs  # noqa: F401 - what datatrove and Prefect's RemoteFileSystem write s3:// through
    except ImportError as e:
        return f"{e.name} is not installed: pip install -c requirements.lock -e '.[cluster]'"
    from botocore.config import Config as BotoConfig

    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    client = boto3.client("s3", config=BotoConfig(connect_timeout=timeout, read_timeout=timeout,
                                                  retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - no endpoint, no bucket, refused credentials: all one message
        return f"{type(e).__name__}: {e}"
    return None


# Where MLflow's SQLite store records a location as an absolute path or `file://` URI (MLflow
# resolves every local artifact location to an absolute one when it creates an experiment).
_LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
              ("model_versions", "source"), ("model_versions", "storage_location"),
              ("logged_models", "artifact_location"))


def reroot_tracking_store(store: Path, experiment: str = "stagewise") -> str | None:
    """Point the artifact locations of a copied or moved workspace's store at its own `artifacts/`.

    MLflow writes `file:///old/workspace/mlflow/artifacts/...` into the database, so a copy (`cp -a`,
    `mv`, a restored backup) would read — and write — the original's files, and fail once the original
    is gone. The experiment's recorded location says where the store was created; when that is not
    this store, every location under the old workspace root is rewritten to the new one, in one
    transaction (locations elsewhere, e.g. an S3 bucket, are left alone). Returns the old root, or
    None when nothing moved. Run before MLflow opens the database.
    """
    from urllib.parse import unquote, urlparse

    db = Path(store) / "mlflow.db"
    if not db.exists() or db.stat().st_size == 0:
        return None
    con = sqlite3.connect(db, timeout=30)
    try:
        row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        suffix = "/mlflow/artifacts"
        if not row or not (row[0] or "").startswith("file://") or not row[0].endswith(suffix):
            return None
        old_uri = row[0][: -len(suffix)]
        new_root = Path(store).resolve().parent
        new_uri = new_root.as_uri()
        if old_uri == new_uri:
            return None
        old_path = unquote(urlparse(old_uri).path)
        with con:   # one transaction: all of it, or none of it
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for old, new in ((old_uri + "/", new_uri + "/"), (old_path + "/", str(new_root) + "/")):
                for table, col in _LOCATIONS:
                    if table in tables:
                        con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) "   # noqa: S608 - fixed names
                                    f"WHERE substr({col}, 1, ?) = ?", (new, len(old) + 1, len(old), old))
        return old_path
    finally:
        con.close()
