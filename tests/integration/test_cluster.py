"""The DAG across hosts: three Linux network namespaces on a bridge, sharing nothing but the network.

- h0 (the services host): PostgreSQL, an S3 store (moto's server), the MLflow server (runs and
  registry in PostgreSQL, artifacts in S3), the Prefect server, the Ray head (no CPUs of its own,
  so no task runs there), and the driver: `stagewise run --profile smoke` with `ops.engine: ray`
  (the data phase, pretrain and SFT: the first two registered models).
- h1, h2 (workers): `ray start` with 1 CPU each; the sharded data steps' tasks run there, their
  inputs and outputs in S3 (`ops.ray_scratch`); so do the training stages' Ray Train ranks: pretrain
  as one rank, SFT (`sft.resources.num_workers: 2`) as DDP with one rank on each worker.

Checks: the run finishes and registers pretrain's and SFT's models; quality's and dedup's tasks ran on both workers;
SFT's two ranks ran on different workers, saw world size 2, read their inputs from S3 and ended with the same weights; the curated data equals
a one-process run's byte for byte; the model artifacts and (after `dvc push`) the DVC objects are in
the bucket; and teardown leaves no namespace, process or link behind. Then a fault: h1's processes are
killed in the middle of a second run's dedup step; that run finishes on h2 with the same curated data. And
a fault in training: h1 rejoins, SFT runs as one Ray Train rank, and the host running it is killed once its
first checkpoint is in S3; Ray Train restarts the rank on the other host, which resumes from that checkpoint,
and the run registers one SFT version (its Prefect task results in S3 too). Root and `ip netns` are needed:
elsewhere the test skips with one line. Traffic goes only to these namespaces' addresses.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import make_workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
TAG = f"sw{os.getpid() % 100000}"          # names of this test's namespaces and links
NET = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"  # a /24 no one else here uses
HOSTS = {"h0": f"{NET}.10", "h1": f"{NET}.11", "h2": f"{NET}.12"}
BRIDGE_IP = f"{NET}.1"
PORTS = {"pg": 5432, "s3": 9000, "mlflow": 5000, "prefect": 4200, "ray": 6379}
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_ENDPOINT_URL": f"http://{HOSTS['h0']}:{PORTS['s3']}"}
BUCKET = "stagewise"
# the first test's workspace: its data and pretrain are up to date, so a later run can start at SFT
SMOKE_WS: list[Path] = []
# Ray's token authentication, one token for every node and driver of this cluster (as on real hosts)
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()[-500:]}")
    return out


def ns(host: str) -> str:
    return f"{TAG}-{host}"


def in_ns(host: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns(host), *cmd]


class Cluster:
    """The namespaces, their links and every process started in them; `down()` undoes all of it."""

    def __init__(self, base: Path):
        self.base, self.procs, self.made = base, [], []

    def up(self) -> None:
        sh("ip", "link", "add", f"{TAG}-br", "type", "bridge")
        self.made.append(("link", f"{TAG}-br"))
        sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", f"{TAG}-br")
        sh("ip", "link", "set", f"{TAG}-br", "up")
        for host, ip in HOSTS.items():
            sh("ip", "netns", "add", ns(host))
            self.made.append(("netns", ns(host)))
            veth, peer = f"{TAG}{host}a", f"{TAG}{host}b"
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            self.made.append(("link", veth))
            sh("ip", "link", "set", veth, "master", f"{TAG}-br", "up")
            sh("ip", "link", "set", peer, "netns", ns(host))
            sh(*in_ns(host, "ip", "addr", "add", f"{ip}/24", "dev", peer))
            sh(*in_ns(host, "ip", "link", "set", peer, "up"))
            sh(*in_ns(host, "ip", "link", "set", "lo", "up"))

    def start(self, host: str, name: str, cmd: list[str], env: dict | None = None, user: str | None = None):
        log = open(self.base / f"{host}-{name}.log", "w")
        full = in_ns(host, *(["runuser", "-u", user, "--"] if user else []), *cmd)
        proc = subprocess.Popen(full, env=dict(os.environ, **(env or {})), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.base)
        self.procs.append(proc)
        return proc

    def log(self, host: str, name: str) -> str:
        p = self.base / f"{host}-{name}.log"
        return p.read_text()[-3000:] if p.exists() else ""

    def pids(self, host: str) -> list[int]:
        out = sh("ip", "netns", "pids", ns(host), check=False)
        return [int(p) for p in out.stdout.split()]

    def down(self) -> None:
        # every process of every namespace, by pid (never by name: other Ray clusters may run here)
        for sig in (15, 9):
            for host in HOSTS:
                if ("netns", ns(host)) in self.made:
                    for pid in self.pids(host):
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            pass
            deadline = time.time() + 20
            while time.time() < deadline and any(self.pids(h) for h in HOSTS if ("netns", ns(h)) in self.made):
                time.sleep(0.5)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for kind, name in reversed(self.made):
            if kind == "netns":
                sh("ip", "netns", "del", name, check=False)
            else:
                sh("ip", "link", "del", name, check=False)


def wait_for(what: str, ok, proc, cluster: Cluster, host: str, name: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{cluster.log(host, name)}")
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    pytest.fail(f"{what} did not start in {timeout} s:\n{cluster.log(host, name)}")


def http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=3) as r:
        return r.status == 200


def can_make_namespaces() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "not root or no `ip` (iproute2)"
    probe = f"{TAG}-probe"
    out = sh("ip", "netns", "add", probe, check=False)
    if out.returncode:
        return f"ip netns add failed ({out.stderr.strip()[:120]})"
    sh("ip", "netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")
    pytest.importorskip("psycopg", reason="the ops extra is not installed")
    why = can_make_namespaces()
    if why:
        pytest.skip(f"cannot make network namespaces here: {why}")
    pg = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not pg:
        pytest.skip("PostgreSQL not installed (apt-get install -y postgresql; .ci/run does it)")
    # Not under pytest's basetemp (private to root; PostgreSQL runs as `postgres`); short: Ray's sockets
    base = Path(tempfile.mkdtemp(prefix=f"{TAG}-"))
    os.chmod(base, 0o755)
    c = Cluster(base)
    try:
        c.up()
        h0 = HOSTS["h0"]
        # PostgreSQL
        pgbin = Path(pg[-1]).parent
        (base / "pg").mkdir()
        shutil.chown(base / "pg", "postgres")
        out = sh("runuser", "-u", "postgres", "--", str(pgbin / "initdb"), "-D", str(base / "pg" / "data"), "-A", "trust",
                 "-U", "postgres", "--no-sync", timeout=180)
        with open(base / "pg" / "data" / "pg_hba.conf", "a") as f:
            f.write(f"host all all {NET}.0/24 trust\n")   # the hosts' subnet only
        pgp = c.start("h0", "postgres", [str(pgbin / "postgres"), "-D", str(base / "pg" / "data"), "-p", str(PORTS["pg"]),
                                          "-k", str(base / "pg"), "-c", f"listen_addresses={h0}", "-c", "fsync=off"],
                      user="postgres")
        wait_for("PostgreSQL", lambda: sh(*in_ns("h0", "runuser", "-u", "postgres", "--", str(pgbin / "createdb"), "-h", h0,
                                                 "-p", str(PORTS["pg"]), "-U", "postgres", "mlflow"),
                                          timeout=30).returncode == 0, pgp, c, "h0", "postgres")
        # S3 (moto's server) and its bucket
        s3 = c.start("h0", "s3", [str(BIN / "moto_server"), "-H", h0, "-p", str(PORTS["s3"])])
        wait_for("moto", lambda: http_ok(AWS["AWS_ENDPOINT_URL"]), s3, c, "h0", "s3")
        import boto3

        s3c = boto3.client("s3", endpoint_url=AWS["AWS_ENDPOINT_URL"], aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        s3c.create_bucket(Bucket=BUCKET)
        # MLflow: runs and registry in PostgreSQL, artifacts in S3
        env = dict(AWS, MLFLOW_S3_ENDPOINT_URL=AWS["AWS_ENDPOINT_URL"], PATH=f"{BIN}:{os.environ['PATH']}")
        ml = c.start("h0", "mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                      f"postgresql://postgres@{h0}:{PORTS['pg']}/mlflow", "--serve-artifacts",
                                      "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", h0,
                                      "--port", str(PORTS["mlflow"]), "--workers", "1"], env=env)
        # Prefect's server (its own SQLite)
        pf = c.start("h0", "prefect", [str(BIN / "prefect"), "server", "start", "--host", h0, "--port",
                                       str(PORTS["prefect"])],
                     env=dict(PREFECT_HOME=str(base / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false"))
        # Ray: a head with no CPUs (tasks must go to the workers), two 1-CPU workers
        ray_env = dict(AWS, **RAY_AUTH, OMP_NUM_THREADS="1")
        c.start("h0", "ray", [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", h0, "--port",
                              str(PORTS["ray"]), "--num-cpus", "0", "--include-dashboard", "false",
                              "--temp-dir", str(base / "ray-h0")], env=ray_env)
        wait_for("MLflow server", lambda: http_ok(f"http://{h0}:{PORTS['mlflow']}/health"), ml, c, "h0", "mlflow")
        wait_for("Prefect server", lambda: http_ok(f"http://{h0}:{PORTS['prefect']}/api/health"), pf, c, "h0", "prefect")
        for host in ("h1", "h2"):
            start_worker(c, host)
        yield c, s3c
    finally:
        c.down()
        shutil.rmtree(base, ignore_errors=True)


def start_worker(c: Cluster, host: str) -> None:
    """A Ray worker host of 1 CPU joins the head (AWS_* in its environment: the tasks read and write S3)."""
    # gloo (DDP on CPUs) finds its interface by the hostname, which every namespace shares here (only
    # the network is split): name the host's own link instead
    c.start(host, "ray", [str(BIN / "ray"), "start", "--block", "--address", f"{HOSTS['h0']}:{PORTS['ray']}",
                          "--node-ip-address", HOSTS[host], "--num-cpus", "1", "--temp-dir", str(c.base / f"ray-{host}")],
            env=dict(AWS, **RAY_AUTH, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=f"{TAG}{host}b"))


def wait_for_workers(c: Cluster, env: dict, n: int) -> None:
    """n worker nodes (with CPUs) alive in the Ray cluster, bounded."""
    h0 = HOSTS["h0"]
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')))")
    deadline = time.time() + 120
    while True:
        out = subprocess.run(in_ns("h0", str(BIN / "python"), "-c", probe, f"{h0}:{PORTS['ray']}"), env=env,
                             capture_output=True, text=True, timeout=120)
        if out.stdout.strip().endswith(str(n)):
            return
        if time.time() > deadline:
            pytest.fail("the Ray workers did not join:\n" + out.stderr[-2000:] + c.log("h1", "ray") + c.log("h2", "ray"))
        time.sleep(2)


def driver_env(ws: Path) -> dict:
    """The driver's environment on h0: the services' addresses, S3 keys, Ray's token, one thread."""
    h0 = HOSTS["h0"]
    return dict(os.environ, **AWS, MLFLOW_TRACKING_URI=f"http://{h0}:{PORTS['mlflow']}",
                PREFECT_API_URL=f"http://{h0}:{PORTS['prefect']}/api", PREFECT_HOME=str(ws / ".prefect"),
                PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1", **RAY_AUTH)


def assert_curated_as_one_process(ws: Path, local: Path) -> None:
    """quality's and dedup's outputs in `ws` are byte for byte one process's on the same ingested records."""
    from stagewise.config import load_config
    from tasks.dedup import dedup
    from tasks.quality import quality

    cfg = load_config(ws / "params.yaml", "smoke", [])
    quality(cfg.quality, ws / "data" / "02_ingested", local / "q")
    dedup(cfg.dedup, local / "q", local / "d")
    for mine, theirs in (("q", "03_filtered"), ("d", "04_deduped")):
        a = {p.relative_to(local / mine): p.read_bytes() for p in (local / mine).rglob("*") if p.is_file()}
        b = {p.relative_to(ws / "data" / theirs): p.read_bytes() for p in (ws / "data" / theirs).rglob("*") if p.is_file()}
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), theirs


def test_the_smoke_data_phase_pretrain_and_a_two_host_ddp_sft_run_across_three_hosts(cluster, tmp_path):
    c, s3c = cluster
    h0 = HOSTS["h0"]
    ws = make_workspace(tmp_path / "ws")
    os.chmod(tmp_path, 0o755)
    env = driver_env(ws)
    wait_for_workers(c, env, 2)   # both workers joined before the run starts

    # The smoke profile's data phase and its first two registered models (pretrain; SFT as DDP over
    # both workers, 40 steps of it): what crosses hosts. The later stages are placed the same way;
    # the whole profile on 2 shared cores took > 15 min beside a Ray cluster and five servers, past
    # this test's budget.
    stages = "generate,ingest,quality,dedup,decontaminate,validate,tokenizer,pretrain,sft"
    run = subprocess.run(in_ns("h0", str(BIN / "stagewise"), "run", "--profile", "smoke", "--stages", stages,
                               "--config", str(ws / "params.yaml"), "--set", "ops.engine=ray",
                               "--set", f"ops.ray_address={h0}:{PORTS['ray']}", "--set", "ops.data_tasks=4",
                               "--set", f"ops.ray_scratch=s3://{BUCKET}/shards", "--set", "sft.resources.num_workers=2",
                               "--set", "sft.max_steps=40"),
                         cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    assert {r["name"] for r in summary["stages"] if r.get("model_version")} >= {"pretrain", "sft"}, summary["stages"]

    # placement: every sharded stage's tasks, and both workers among them; none on the head
    def placement(stage: str) -> list[dict]:
        body = s3c.get_object(Bucket=BUCKET, Key=f"shards/placement/{stage}.json")["Body"].read()
        return json.loads(body)

    for stage in ("quality-judge", "dedup-signatures"):
        placed = placement(stage)
        assert sorted(p["task"] for p in placed) == [0, 1, 2, 3], stage
        assert {p["node_ip"] for p in placed} == {HOSTS["h1"], HOSTS["h2"]}, (stage, placed)
    # training: pretrain as one Ray Train rank on a worker; SFT as DDP, one rank on each worker
    ranks = placement("train-pretrain")
    assert [(r["world_size"], r["reserved"]) for r in ranks] == [(1, {"CPU": 1.0})], ranks
    assert ranks[0]["node_ip"] in (HOSTS["h1"], HOSTS["h2"])
    ranks = placement("train-sft")
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)], ranks
    assert {r["node_ip"] for r in ranks} == {HOSTS["h1"], HOSTS["h2"]}, ranks
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # the ranks read the parent and the curated data from their own copies, fetched from S3, not the driver's folders
    for r in ranks:
        assert set(r["read"]) == {"parent_dir", "curated_dir"} and not any(str(ws) in p for p in r["read"].values()), r

    # curation: byte-identical to one process on the same ingested records
    assert_curated_as_one_process(ws, tmp_path / "local")

    # the stores: model files in S3 through the MLflow server; nothing in the workspace's own store
    keys = [o["Key"] for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    assert any(k.startswith("mlflow/") and k.endswith("model.safetensors") for k in keys)
    assert not (ws / "mlflow" / "mlflow.db").exists()
    # the shards' run folders are gone from S3 (only the placement records stay)
    assert all(k.startswith(("mlflow/", "shards/placement/")) for k in keys), keys[:20]

    # the DVC remote in the same bucket: the curated data's objects land there
    dvc = str(BIN / "dvc")
    for cmd in ([dvc, "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc"],
                [dvc, "remote", "modify", "store", "endpointurl", AWS["AWS_ENDPOINT_URL"]], [dvc, "push"]):
        out = subprocess.run(in_ns("h0", *cmd), cwd=ws, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    lock = (ws / "dvc.lock").read_text()
    dvc_keys = {o["Key"] for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="dvc/")
                for o in page.get("Contents", [])}
    import yaml

    # the data layers (the metrics files are `cache: false`: in git, not in the remote)
    outs = [o for st in yaml.safe_load(lock)["stages"].values() for o in st.get("outs", [])
            if o["path"].startswith("data/")]
    assert len(outs) == 7 and all(any(o["md5"].removesuffix(".dir")[2:] in k for k in dvc_keys) for o in outs)
    SMOKE_WS.append(ws)


def test_a_worker_host_killed_during_dedup_the_data_phase_finishes_on_the_survivor(cluster, tmp_path):
    """A host dies mid-step (issue 26, faults): every process of h1 (its Ray worker and the tasks on it) is
    SIGKILLed once the first dedup task has written its output; datatrove resubmits the lost tasks, h2 runs
    them and the rest of dedup, and the curated data is byte for byte what one process curates. Runs after
    the test above (h1 stays dead; the fixture's teardown removes what is left)."""
    c, s3c = cluster
    h0 = HOSTS["h0"]
    ws = make_workspace(tmp_path / "ws")
    os.chmod(tmp_path, 0o755)
    env = driver_env(ws)
    run = subprocess.Popen(in_ns("h0", str(BIN / "stagewise"), "run", "--profile", "smoke", "--stages",
                                 "generate,ingest,quality,dedup", "--config", str(ws / "params.yaml"),
                                 "--set", "ops.engine=ray", "--set", f"ops.ray_address={h0}:{PORTS['ray']}",
                                 "--set", "ops.data_tasks=4", "--set", f"ops.ray_scratch=s3://{BUCKET}/fault"),
                           cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = [], time.time() + 600
    while run.poll() is None and time.time() < deadline and not killed:
        keys = [o["Key"] for o in s3c.list_objects_v2(Bucket=BUCKET, Prefix="fault/dedup-").get("Contents", [])]
        if any("/out/" in k for k in keys):   # dedup is under way: one signatures task is done
            for pid in c.pids("h1"):
                try:
                    os.kill(pid, 9)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)
    out, err = run.communicate(timeout=max(60, deadline - time.time()))
    assert killed, "dedup ended before the first dedup task's output was seen: nothing was killed\n" + err[-3000:]
    assert run.returncode == 0, out[-3000:] + err[-6000:]
    assert not c.pids("h1")   # the host stayed dead

    # what ran after the kill ran on the survivor
    def placement(stage: str) -> list[dict]:
        return json.loads(s3c.get_object(Bucket=BUCKET, Key=f"fault/placement/{stage}.json")["Body"].read())

    for stage in ("dedup-buckets", "dedup-cluster_task"):
        assert {p["node_ip"] for p in placement(stage)} == {HOSTS["h2"]}, (stage, placement(stage))

    # and what it wrote is what one process writes
    assert_curated_as_one_process(ws, tmp_path / "local")


def rank_host(c: Cluster) -> str | None:
    """The worker host whose namespace runs a Ray Train rank (its process title names the actor class)."""
    for host in ("h1", "h2"):
        for pid in c.pids(host):
            try:
                if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return host
            except OSError:   # gone meanwhile
                pass
    return None


def test_a_worker_host_killed_during_sft_the_stage_resumes_from_its_s3_checkpoint_on_the_survivor(cluster, tmp_path):
    """A host dies mid-training (issue 26, faults): SFT runs as one Ray Train rank on a worker; once its
    first training checkpoint is in S3, every process of that rank's host is SIGKILLed. Ray Train's
    FailureConfig restarts the rank on the other worker, which restores that checkpoint from S3 and resumes;
    the run exits 0 and registers one SFT version, the published model's, whose weights an undisturbed run
    of the same SFT trains bit for bit. The run's Prefect task results go to S3 too (`ops.result_storage`),
    not to the driver's disk."""
    c, s3c = cluster
    h0 = HOSTS["h0"]
    # h1 died in the test above: it comes back, as a replaced host joins a cluster
    if not c.pids("h1"):
        start_worker(c, "h1")
    # the first test's workspace (its data and pretrain up to date: only SFT runs); alone, a fresh one
    # (the run then makes SFT's missing inputs first)
    ws = SMOKE_WS[0] if SMOKE_WS else make_workspace(tmp_path / "ws")
    os.chmod(tmp_path, 0o755)
    env = driver_env(ws)
    wait_for_workers(c, env, 2)
    from mlflow.tracking import MlflowClient

    from stagewise.hashing import dir_hash

    server = f"http://{h0}:{PORTS['mlflow']}"
    registry = MlflowClient(tracking_uri=server, registry_uri=server)   # never a registry URI set in-process earlier

    def sft_versions() -> dict:
        return {v.version: v for v in registry.search_model_versions("name='stagewise'") if v.tags.get("stage") == "sft"}

    before = sft_versions()
    local_results = ws / ".prefect" / "storage"   # Prefect's default result store: this host's disk
    local_before = set(local_results.iterdir()) if local_results.is_dir() else set()
    steps, every = 40, 10   # a checkpoint every 10 steps (the smoke profile saves every 50)

    def sft_run(scratch: str, *extra: str) -> list[str]:
        return in_ns("h0", str(BIN / "stagewise"), "run", "--profile", "smoke", "--stages", "sft", *extra,
                     "--config", str(ws / "params.yaml"), "--set", "ops.engine=ray",
                     "--set", f"ops.ray_address={h0}:{PORTS['ray']}",
                     "--set", f"ops.ray_scratch=s3://{BUCKET}/{scratch}",
                     "--set", f"ops.result_storage=s3://{BUCKET}/prefect-results",
                     "--set", "sft.resources.num_workers=1", "--set", f"sft.max_steps={steps}",
                     "--set", f"sft.save_steps={every}", "--set", "sft.eval_limit=8")

    t0 = time.time()
    run = subprocess.Popen(sft_run("sftfault"), cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    killed, deadline = {}, time.time() + 600
    while run.poll() is None and time.time() < deadline and not killed:
        keys = [o["Key"] for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="sftfault/train/")
                for o in page.get("Contents", [])]
        first = sorted(k for k in keys if "/train-step-" in k)
        if first:
            # Ray Train's controller takes a rank's report on its next poll (every 2 s): let it register
            time.sleep(2.5)
            host = rank_host(c)
            assert host, "no worker host runs the SFT rank"
            killed = {"host": host, "checkpoint": first[0].split("/")[3], "after_s": round(time.time() - t0, 1),
                      "pids": c.pids(host), "load": os.getloadavg()[0]}
            for pid in killed["pids"]:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
    out, err = run.communicate(timeout=max(60, deadline - time.time()))
    wall = time.time() - t0
    assert killed, "SFT ended before its first checkpoint was seen in S3: nothing was killed\n" + err[-3000:]
    assert run.returncode == 0, out[-3000:] + err[-6000:]
    survivor = "h2" if killed["host"] == "h1" else "h1"
    assert not c.pids(killed["host"])   # the host stayed dead
    ranks = json.loads(s3c.get_object(Bucket=BUCKET, Key="sftfault/placement/train-sft.json")["Body"].read())
    print(f"\nSFT fault: {killed['host']} ({HOSTS[killed['host']]}) killed {killed['after_s']} s into the run, after "
          f"{killed['checkpoint']} was in S3 ({len(killed['pids'])} processes, load {killed['load']:.1f}); the run "
          f"took {wall:.0f} s; the rank finished on {ranks[0]['node_ip']} (node {ranks[0]['node_id'][:12]}), resumed "
          f"from step {ranks[0]['resumed_from_step']}; driver: "
          + " | ".join(line for line in err.splitlines() if "rank(s) on node(s)" in line))

    # the rank finished on the survivor, resumed from a checkpoint it had reported (a multiple of save_steps)
    assert [(r["rank"], r["world_size"], r["node_ip"]) for r in ranks] == [(0, 1, HOSTS[survivor])], ranks
    resumed = ranks[0]["resumed_from_step"]
    assert resumed and resumed % every == 0 and resumed < steps, ranks
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    row = next(r for r in summary["stages"] if r["name"] == "sft")
    assert row["resumed_from_step"] == resumed and row["steps"] == steps, row

    # one new SFT version, the published model's (never a half-written or intermediate one)
    new = {k: v for k, v in sft_versions().items() if k not in before}
    assert list(new) == [str(row["model_version"])], new
    tags = new[str(row["model_version"])].tags
    assert tags["weights_hash"] == dir_hash(ws / "models" / "sft", "*.safetensors")
    assert tags["pipeline_run"] == summary["run_id"]
    assert json.loads((ws / "models" / "sft" / "stage_info.json").read_text())["steps"] == steps

    # written only to S3 and the driver's workspace: the Ray Train run's folder (checkpoints, inputs) is gone
    # from S3, the rank's folder from the hosts' disk (the survivor's attempt removes the dead one's too),
    # and the run's Prefect task results are in the bucket, not in the driver's PREFECT_HOME
    keys = [o["Key"] for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="sftfault/")
            for o in page.get("Contents", [])]
    assert keys == ["sftfault/placement/train-sft.json"], keys
    assert not Path(ranks[0]["read"]["parent_dir"]).parent.parent.exists(), ranks[0]["read"]
    # (Prefect persists a stage's row under a key only for a registry hit: pretrain's here; SFT trained)
    results = [o["Key"] for o in s3c.list_objects_v2(Bucket=BUCKET, Prefix="prefect-results/").get("Contents", [])]
    assert any(k.startswith("prefect-results/stagewise-pretrain-") for k in results), results
    assert (set(local_results.iterdir()) if local_results.is_dir() else set()) == local_before
    assert not (ws / "mlflow" / "mlflow.db").exists()

    # the same SFT again, undisturbed (`--force-stage sft`: the registry would otherwise hand back the
    # version above): the resumed run's weights are the ones it trains, bit for bit
    fault_hash = tags["weights_hash"]
    before = sft_versions()
    plain = subprocess.run(sft_run("sftplain", "--force-stage", "sft"), cwd=ws, env=env, capture_output=True, text=True,
                           timeout=600)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-6000:]
    again = {k: v for k, v in sft_versions().items() if k not in before}
    assert len(again) == 1, again
    undisturbed = json.loads(s3c.get_object(Bucket=BUCKET, Key="sftplain/placement/train-sft.json")["Body"].read())
    assert not undisturbed[0]["resumed_from_step"], undisturbed
    assert next(iter(again.values())).tags["weights_hash"] == fault_hash
    print(f"undisturbed rerun on {undisturbed[0]['node_ip']}: weights hash {fault_hash}, the resumed run's")


@pytest.fixture(scope="module", autouse=True)
def _nothing_left_behind():
    """After the cluster fixture's teardown (module fixtures unwind in reverse): no namespace or link."""
    yield
    netns = sh("ip", "netns", "list", check=False).stdout if shutil.which("ip") else ""
    links = sh("ip", "-o", "link", "show", check=False).stdout if shutil.which("ip") else ""
    assert TAG not in netns and f"{TAG}-br" not in links and f"{TAG}h" not in links
