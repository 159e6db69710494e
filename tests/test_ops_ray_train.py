"""A training stage on Ray Train (`ops.engine: ray`): SFT placed by `sft.resources`, as DDP over two
ranks, trains the model one process trains (within float noise), publishes and registers like a local run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stage_fixtures import curated, pretrained, smoke_cfg

ray = pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")

STEPS = 6
# One optimizer step moves a weight by about the learning rate (Adam; the smoke profile's sft lr is
# 2e-3), so a rank that trained on its own batch or missed a gradient all-reduce would be ~1e-3 off.
# What DDP changes is only the order of float32 sums (the two ranks' gradients are all-reduced instead
# of summed in one batch): measured 2e-7 on the weights and 2.4e-7 on the logged losses after 6 steps.
# 1e-4 leaves 500x room for other CPUs' kernels and stays 10x below one step's move.
TOL = 1e-4


@pytest.fixture(scope="module")
def local_ray():
    # two CPUs at most: the machine is shared; no dashboard
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cfg_for(tmp: Path, *sets: str):
    return smoke_cfg(f"sft.max_steps={STEPS}", "train.logging_steps=1", "sft.eval_limit=8", *sets)


def on_ray(tmp: Path, workers: int, scratch: str | None = None):
    # a checkpoint every 3 steps: the ranks report each to Ray Train (two ranks: merged into one), which
    # must not change what they train
    return cfg_for(tmp, "ops.engine=ray", f"ops.ray_scratch={scratch or tmp / 'scratch'}",
                   f"sft.resources.num_workers={workers}", "sft.resources.num_cpus=1", "sft.save_steps=3")


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow   # two Ray Train runs (Ray workers import torch + TRL) and a local one: ~1.5-2 min on 2 busy cores
def test_sft_as_ddp_over_two_ray_ranks_trains_the_one_process_model_and_registers_like_a_local_run(local_ray, tmp_path):
    import mlflow

    from stagewise import registry
    from stagewise.hashing import dir_hash
    from tasks.sft import sft

    parent, cur = pretrained()[0], curated()
    uri = registry.setup_tracking(tmp_path)
    placement = tmp_path / "scratch" / "placement" / "train-sft.json"

    local = sft(cfg_for(tmp_path), parent, cur, tmp_path / "local")
    one = sft(on_ray(tmp_path, 1), parent, cur, tmp_path / "one")
    ranks_one = json.loads(placement.read_text())
    # a URL scratch, as on a cluster (s3://): the ranks share no disk with the caller, so the inputs travel
    # through the store (file:// is the same code path through fsspec, on this host's disk)
    with mlflow.start_run(run_name="sft") as run:   # as run_stage does: the ranks log into the caller's run
        two = sft(on_ray(tmp_path, 2, f"file://{tmp_path / 'scratch'}"), parent, cur, tmp_path / "two", report_to="mlflow")
    ranks_two = json.loads(placement.read_text())

    # placement: one rank, then two, each holding the CPU its request reserved; both see world size 2
    assert [(r["rank"], r["world_size"], r["reserved"]) for r in ranks_one] == [(0, 1, {"CPU": 1.0})]
    assert [(r["rank"], r["world_size"], r["reserved"]) for r in ranks_two] == [(0, 2, {"CPU": 1.0}), (1, 2, {"CPU": 1.0})]
    # DDP keeps the ranks' copies equal: the same weights hash on both at the end
    assert ranks_two[0]["weights_sha256"] == ranks_two[1]["weights_sha256"]
    # with the local scratch the one rank read the caller's folders; through the store, each rank its own copies
    assert ranks_one[0]["read"] == {"parent_dir": str(parent), "curated_dir": str(cur)}
    for r in ranks_two:
        assert set(r["read"]) == {"parent_dir", "curated_dir"}
        assert all(str(tmp_path) not in p and str(parent) not in p and str(cur) not in p for p in r["read"].values()), r
        assert r["read"]["curated_dir"].endswith("/ws/data/05_curated")

    # one rank on Ray is the local run, bit for bit (same code, one process)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "local")) == 0.0
    assert one["train_metrics"]["final_loss"] == local["train_metrics"]["final_loss"]
    # two ranks, each half of every step's batch: the same loss curve and weights within float noise ...
    curve_one, curve_two = ranks_one[0]["loss"], ranks_two[0]["loss"]
    assert [s for s, _ in curve_one] == [s for s, _ in curve_two] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(curve_one, curve_two)) < TOL, (curve_one, curve_two)
    assert max_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) < TOL
    # ... while training moved the weights far more than that (the comparison can fail)
    assert max_diff(weights(tmp_path / "two"), weights(parent)) > 10 * TOL
    assert two["steps"] == one["steps"] == STEPS and two["n_train"] == one["n_train"]

    # the published folder: what a local run writes, naming the caller's folder; the trainers' curve in
    # the caller's MLflow run (rank 0 logged it)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    info = json.loads((tmp_path / "two" / "stage_info.json").read_text())
    assert info["stage"] == "sft" and info["model_dir"] == two["model_dir"] == str(tmp_path / "two")
    # the store named, not MLflow's process-wide URIs (another test file may have moved them)
    logged = mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in logged] == [(s, pytest.approx(v)) for s, v in curve_two]
    # registered and downloaded like a local run's folder
    with mlflow.start_run(run_name="sft-register") as reg:
        pass
    v = registry.log_model_version(tmp_path / "two", "ddp-sft", "sft", {"parent_version": "none"}, reg.info.run_id)
    got = registry.download_model("ddp-sft", v, tmp_path / "downloaded")
    assert dir_hash(got, "*.safetensors") == dir_hash(tmp_path / "two", "*.safetensors")
    # the Ray Train runs' folders are gone; only the placement records stay
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["placement", "train"]
    assert not any((tmp_path / "scratch" / "train").iterdir())


@pytest.mark.slow   # a local Ray (the module's): ~10 s
def test_a_resource_request_the_cluster_cannot_hold_is_one_error_naming_the_setting(local_ray, tmp_path):
    """Ray Train would wait for the ranks forever: 3 ranks of 1 CPU on a 2-CPU Ray are refused at once."""
    from stagewise.errors import ConfigError
    from tasks.sft import sft

    with pytest.raises(ConfigError, match=r"sft.resources: 3 rank\(s\) of \{CPU: 1, GPU: 0\} each do not fit the "
                                          r"Ray cluster \(room for 2; its nodes: \{CPU: 2, GPU: 0\}\)"):
        sft(on_ray(tmp_path, 3), pretrained()[0], curated(), tmp_path / "sft")
    assert not (tmp_path / "sft").exists()


@pytest.mark.slow   # three 2-rank Ray Train runs: ~35 s each on 2 busy cores
@pytest.mark.parametrize("stage", ["pretrain", "preference", "reasoning"])
def test_the_other_training_stages_run_as_two_ddp_ranks(local_ray, tmp_path, stage):
    """pretrain, DPO and GRPO on two ranks: both in one world of 2, the same weights at the end, the model
    published. (pretrain's final evaluation is a collective: every rank must take part, or the ranks' next
    collectives mismatch.)"""
    import importlib

    from stage_fixtures import sft_model, tokenizer_dir

    sets = {"pretrain": ["pretrain.max_steps=6"],
            "preference": ["preference.max_steps=4", "preference.eval_limit=8"],
            "reasoning": ["reasoning.max_steps=2", "reasoning.eval_limit=8", "reasoning.warm_start_below=0"]}[stage]
    cfg = smoke_cfg("ops.engine=ray", f"ops.ray_scratch={tmp_path / 'scratch'}", f"{stage}.resources.num_workers=2",
                    *sets)
    inputs = (tokenizer_dir(), curated()) if stage == "pretrain" else (sft_model()[0], curated())
    res = getattr(importlib.import_module(f"tasks.{stage}"), stage)(cfg, *inputs, tmp_path / stage)
    ranks = json.loads((tmp_path / "scratch" / "placement" / f"train-{stage}.json").read_text())
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert res["steps"] == int(sets[0].split("=")[1])
    assert json.loads((tmp_path / stage / "stage_info.json").read_text())["stage"] == stage
    if stage == "pretrain":
        assert "eval_loss" in res["train_metrics"]


def _rank_processes() -> list:
    """The Ray Train ranks of this test's own local Ray: the raylet's descendants (never by name alone:
    other Ray clusters may run on this machine)."""
    import psutil

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


@pytest.mark.slow   # a local SFT and a Ray Train run with one restart: ~1 min on 2 busy cores
def test_a_rank_killed_after_a_checkpoint_is_restarted_and_trains_the_undisturbed_model_from_it(local_ray, tmp_path):
    """A rank dies mid-training (SIGKILL, as when its host is lost): Ray Train's FailureConfig restarts it,
    the new rank restores the last checkpoint it reported (`ray.train.get_checkpoint()`) and HF resumes
    from that step (weights, optimizer, scheduler, RNG): the published model is the one an undisturbed
    run trains, and no training checkpoint is left in the storage."""
    import threading

    from tasks.sft import sft

    steps, every = 60, 6
    sets = (f"sft.max_steps={steps}", f"sft.save_steps={every}", "train.logging_steps=1", "sft.eval_limit=8")
    parent, cur = pretrained()[0], curated()
    local = sft(smoke_cfg(*sets), parent, cur, tmp_path / "local")

    scratch = tmp_path / "scratch"
    killed: dict = {}

    def kill_after_the_first_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            first = sorted(scratch.glob("train/sft-*/train-step-*"))
            if first:
                # the controller collects a report on its next poll (every 2 s): let it register the checkpoint
                time.sleep(2.5)
                for p in _rank_processes():
                    killed.setdefault("checkpoint", first[0].name)
                    killed["at"] = time.time()
                    killed.setdefault("pids", []).append(p.pid)
                    p.kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_the_first_checkpoint, daemon=True)
    killer.start()
    res = sft(smoke_cfg(*sets, "ops.engine=ray", f"ops.ray_scratch={scratch}", "sft.resources.num_workers=1",
                        "sft.resources.num_cpus=1", "ops.ray_max_failures=1"), parent, cur, tmp_path / "ray")
    killer.join(5)
    assert killed.get("pids"), "the run ended before a rank could be killed after its first checkpoint"
    ranks = json.loads((scratch / "placement" / "train-sft.json").read_text())
    print(f"killed rank pid(s) {killed['pids']} {time.time() - killed['at']:.1f} s before the end, after "
          f"{killed['checkpoint']} appeared; resumed from step {res['resumed_from_step']}")
    # the restarted rank resumed from a reported checkpoint (a multiple of save_steps, before the end)
    assert res["resumed_from_step"] == ranks[0]["resumed_from_step"]
    assert res["resumed_from_step"] % every == 0 and every <= res["resumed_from_step"] < steps, res
    assert res["steps"] == steps and res["steps_run"] == steps - res["resumed_from_step"]
    # and trained on as if nothing had happened: the undisturbed run's loss curve and weights
    assert [s for s, _ in ranks[0]["loss"]] == list(range(1, steps + 1))
    assert res["train_metrics"]["final_loss"] == local["train_metrics"]["final_loss"]
    assert max_diff(weights(tmp_path / "ray"), weights(tmp_path / "local")) == 0.0
    assert max_diff(weights(tmp_path / "ray"), weights(parent)) > 10 * TOL
    # the published model, not a training checkpoint; Ray's run folder (its checkpoints) is gone
    assert json.loads((tmp_path / "ray" / "stage_info.json").read_text())["stage"] == "sft"
    assert not any((tmp_path / "ray").glob("checkpoint-*")) and not (tmp_path / "ray" / "trainer_state.json").exists()
    assert not any((scratch / "train").iterdir())
