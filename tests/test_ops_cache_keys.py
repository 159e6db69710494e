"""What a stage's cache key depends on, and how far a --force-stage reaches (fast, no training).

Code edits are made to a copy of the source tree and the keys computed from that copy: nothing is
monkeypatched, so a module missing from a step's import closure would show here as a key that did
not move.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tasks
from stagewise.codegraph import PACKAGES, closure, code_version
from stagewise.config import StepConfig, UndeclaredSection, load_config
from stagewise.stage import Lineage, RunContext, cache_key, stage_key

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ("pretrain", "sft", "preference", "reasoning", "compress")


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "params.yaml", "smoke")


def ctx(**kw) -> RunContext:
    return RunContext(run_id="r", root=Path("."), mlflow_run_id=None, registered_model="m", code_version="c",
                      weight_chain=CHAIN, **kw)


def test_force_stage_cascades_to_every_stage_built_on_its_weights():
    forced = ctx(force_stages=["sft"])
    assert {s: forced.forced(s) for s in CHAIN} == {
        "pretrain": False, "sft": True, "preference": True, "reasoning": True, "compress": True}
    # Data steps are cached by content (DVC): forcing one re-runs it, and its consumers only if its outputs change.
    data = ctx(force_stages=["dedup"])
    assert data.forced("dedup") and not data.forced("decontaminate") and not data.forced("pretrain")
    assert all(ctx(force=True).forced(s) for s in ("generate", "pretrain", "reasoning", "compress", "gate"))
    assert not any(ctx().forced(s) for s in ("generate", "pretrain", "compress"))


def test_a_retrained_parent_is_a_new_parent_even_under_the_same_key(cfg):
    pref = tasks.step("preference")
    old = Lineage("sft", "models/sft", "sft-key", version="2", weights_hash="aaaa")
    new = Lineage("sft", "models/sft", "sft-key", version="5", weights_hash="bbbb")
    same = Lineage("sft", "models/sft", "sft-key", version="5", weights_hash="aaaa")
    k_old, k_new = stage_key(pref, cfg, old, "d.dir"), stage_key(pref, cfg, new, "d.dir")
    assert k_old != k_new
    # Identical weights (a deterministic re-train) are the same input: the version number is not content.
    assert stage_key(pref, cfg, same, "d.dir") == k_old
    assert stage_key(pref, cfg, old, "other.dir") != k_old


def chain_keys(cfg, root: Path) -> dict[str, str]:
    """Cache keys of the weight chain, each stage's parent being the one before (same weights)."""
    parent, keys = Lineage("init", "models/init", "init-key", weights_hash="w0"), {}
    for name in CHAIN:
        st = tasks.step(name)
        keys[name] = cache_key(st, cfg, parent, "d.dir", code_version(st.module, root))
        parent = Lineage(name, f"models/{name}", keys[name], weights_hash="w")
    return keys


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("module, first", [
    ("stagewise/ppo.py", "preference"),                 # RLHF's PPO loop (preference.method: rlhf)
    ("stagewise/compression/data.py", "preference"),    # the replay term's batching (DPO, then GRPO)
    ("stagewise/replay.py", "preference"),
    ("stagewise/compression/measure.py", "compress"),
    ("stagewise/modeling.py", "pretrain"),              # shared by every stage
    ("tasks/sft.py", "sft"),
])
def test_editing_a_module_rekeys_the_first_step_that_imports_it_and_everything_after(cfg, tree, module, first):
    before = chain_keys(cfg, tree)
    path = tree / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# one byte of a comment changes the code version\n")
        after = chain_keys(cfg, tree)
    finally:
        path.write_bytes(original)
    changed = [s for s in CHAIN if after[s] != before[s]]
    assert changed == list(CHAIN[CHAIN.index(first):]), (module, changed)


def test_a_module_no_step_imports_changes_no_key(cfg, tree):
    before = chain_keys(cfg, tree)
    path = tree / "stagewise" / "report.py"     # the gate report: written after every model exists
    assert all("stagewise.report" not in closure(tasks.step(s).module, tree) for s in CHAIN)
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# edited\n")
        assert chain_keys(cfg, tree) == before
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("setting, first", [
    ("sft.lora.r=4", "sft"),                  # and preference, whose LoRA DPO reuses sft.lora
    ("preference.beta=0.2", "preference"),
    ("pretrain.seq_len=48", "pretrain"),      # DPO's and reasoning's replay pack blocks of this length, too
    ("reasoning.replay_coef=0.5", "reasoning"),
    ("preference.replay_coef=0.5", "preference"),
    ("gate.general_max_drop_points=2", "compress"),
    ("run.seed=7", "pretrain"),
])
def test_a_setting_rekeys_the_steps_that_read_it(cfg, tree, setting, first):
    other = load_config(ROOT / "params.yaml", "smoke", [setting])
    before, after = chain_keys(cfg, tree), chain_keys(other, tree)
    changed = [s for s in CHAIN if after[s] != before[s]]
    assert changed == list(CHAIN[CHAIN.index(first):]), (setting, changed)


def test_direct_readers_of_a_section_are_rekeyed_even_mid_chain(cfg):
    """sft.lora.r moves preference's own config part (not only through its parent's key)."""
    other = load_config(ROOT / "params.yaml", "smoke", ["sft.lora.r=4"])
    parent = Lineage("sft", "models/sft", "same-parent", weights_hash="w")
    for name, moves in (("preference", True), ("reasoning", True), ("gate", False)):
        st = tasks.step(name)
        assert (cache_key(st, cfg, parent, "d", "c") != cache_key(st, other, parent, "d", "c")) is moves, name


def test_settings_that_cannot_change_results_change_no_key(cfg, tree):
    other = load_config(ROOT / "params.yaml", "smoke", ["ops.lock_timeout=5"])
    assert chain_keys(other, tree) == chain_keys(cfg, tree)


def test_a_step_reading_an_undeclared_section_fails_loudly(cfg):
    seen = StepConfig(cfg, "sft", tasks.step("sft").reads)
    assert seen.sft.lora.r == cfg.sft.lora.r and seen.run.seed == cfg.run.seed
    with pytest.raises(UndeclaredSection, match=r"step 'sft' read params section 'reasoning'.*add 'reasoning' to its reads"):
        seen.reasoning.beta
    with pytest.raises(UndeclaredSection, match="'gate'"):
        seen.section("gate")
