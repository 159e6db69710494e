"""What `auto` training settings become (stagewise/recipes.py): pure rules, real inputs, the numbers
they must give; the demo world keeps its tuned values; the resolved numbers are in the cache key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stagewise import recipes
from stagewise.config import ConfigError, load_config
from stagewise.recipes import Facts
from stagewise.stage import stage_key
from tasks import step

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = 918_656   # parameters of the demo model (hidden 128, 4 layers, vocab 1024, tied embedding)


def test_pretrain_steps_from_the_token_budget():
    # 20 tokens/param x 0.92M = 18.4M tokens, but a 60k-token corpus caps it at 8 epochs = 480k tokens
    tokens = recipes.pretrain_tokens(DEMO_MODEL, 60_000, tokens_per_param=20, max_epochs=8)
    assert tokens == 480_000
    assert recipes.steps_for_tokens(tokens, batch_size=16, seq_len=128, min_steps=100) == 235   # ceil(480k / 2048)
    # a corpus big enough for the whole budget: tokens per parameter decide
    assert recipes.pretrain_tokens(DEMO_MODEL, 10_000_000, 20, 8) == 20 * DEMO_MODEL
    # a tiny corpus still gets the floor
    assert recipes.steps_for_tokens(recipes.pretrain_tokens(DEMO_MODEL, 5_000, 20, 8), 16, 128, 100) == 100


def test_a_bigger_corpus_means_more_steps():
    steps = [recipes.steps_for_tokens(recipes.pretrain_tokens(DEMO_MODEL, n, 20, 8), 16, 128, 100)
             for n in (60_000, 120_000, 240_000)]
    assert steps == [235, 469, 938]


def test_epochs_follow_the_dataset_size():
    # 300 steps x batch 16 = 4,800 rows seen: 600 rows → 8 epochs, 2,400 → 2, 100,000 → 1 (the floor), 100 → 10 (cap)
    got = [recipes.epochs_for_rows(n, batch_size=16, min_steps=300, min_epochs=1, max_epochs=10)
           for n in (600, 2_400, 100_000, 100)]
    assert got == [8.0, 2.0, 1.0, 10.0]
    # DPO: 50 steps x batch 8 over 120 pairs = 3.33 epochs, capped at 3; 400 pairs = 1 epoch
    assert recipes.epochs_for_rows(120, 8, 50, 1, 3) == 3.0
    assert recipes.epochs_for_rows(400, 8, 50, 1, 3) == 1.0


def test_sft_holds_out_a_share_of_the_chats_for_early_stopping():
    assert [recipes.sft_eval_rows(n, 0.1) for n in (300, 1_200, 40, 5)] == [30, 120, 8, 4]


def test_learning_rate_scales_as_one_over_width():
    assert recipes.width_lr(3e-3, 128, 128) == 3e-3
    assert recipes.width_lr(3e-3, 128, 64) == 6e-3
    assert recipes.width_lr(2e-3, 128, 576) == pytest.approx(4.44e-4)   # SmolLM2-135M's width


def test_warmup_is_two_over_one_minus_beta2_steps_capped():
    assert recipes.warmup_ratio(600, beta2=0.95, max_ratio=0.1) == pytest.approx(40 / 600, abs=1e-4)
    assert recipes.warmup_ratio(200, beta2=0.95, max_ratio=0.1) == 0.1            # 40 steps > 10% of 200
    assert recipes.warmup_ratio(900, beta2=0.999, max_ratio=0.1) == 0.1           # 2,000 steps: capped


def test_reasoning_steps_from_passes_over_the_problems():
    # 64 completions / 8 generations = 8 problems per step; 150 problems x 2 passes = 38 steps
    assert recipes.reasoning_steps(150, batch_size=64, num_generations=8, passes=2, min_steps=30) == 38
    assert recipes.reasoning_steps(40, 64, 8, 2, 30) == 30


def _user_params(tmp_path: Path, extra: str = "") -> Path:
    """The project's params.yaml with user sources (the rules decide, not the demo world's values)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["sources"] = {"docs": {"path": str(tmp_path / "c.jsonl"), "kind": "corpus"}}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw) + extra)
    return p


FACTS = Facts(width=128, params=DEMO_MODEL, corpus_tokens=60_000, chats=300, pairs=120, problems=150)


def test_user_data_leaves_auto_until_resolved_and_resolve_gives_numbers(tmp_path):
    cfg = load_config(_user_params(tmp_path), "demo")
    assert set(recipes.unresolved(cfg)) >= {"pretrain.max_steps", "sft.epochs", "preference.epochs",
                                            "reasoning.max_steps", "sft.learning_rate"}
    out, lines = recipes.resolve(cfg, FACTS)
    assert recipes.unresolved(out) == []
    got = {r.setting: r.value for r in lines}
    assert got["pretrain.max_steps"] == 469                       # 16 epochs x 60k tokens / 2,048 per step
    assert got["pretrain.eval_steps"] == got["pretrain.save_steps"] == 47 and got["pretrain.early_stopping_patience"] == 3
    assert got["pretrain.learning_rate"] == 3e-3                  # demo width = the reference width
    # 300 chats, 30 held out for early stopping: 270 chats + 270 replayed documents, 300 x 16 / 540 = 8.9 epochs
    assert got["sft.epochs"] == 8.9 and got["sft.early_stopping_patience"] == 3
    assert got["sft.eval_steps"] == got["sft.save_steps"] == 31   # ceil(540 / 16) x 8.9 = 302.6 steps / 10
    assert got["preference.epochs"] == 3.0 and got["reasoning.max_steps"] == 38
    assert "960,000 tokens" in next(r.line() for r in lines if r.setting == "pretrain.max_steps")
    # a wider model: smaller steps, by the same rule
    wide, _ = recipes.resolve(cfg, Facts(**{**FACTS.__dict__, "width": 256}))
    assert (wide.pretrain.learning_rate, wide.sft.learning_rate) == (1.5e-3, 1e-3)


def test_the_demo_world_keeps_its_tuned_values():
    for profile, pretrain_steps, sft_epochs, reasoning_steps in (("demo", 600, 6.0, 300), ("smoke", 150, 6.0, 40),
                                                                  (None, 600, 10.0, 300)):
        cfg = load_config(ROOT / "params.yaml", profile)
        assert recipes.unresolved(cfg) == []
        assert (cfg.pretrain.max_steps, cfg.sft.epochs, cfg.reasoning.max_steps) == (pretrain_steps, sft_epochs,
                                                                                     reasoning_steps)
        assert cfg.pretrain.early_stopping_patience is None and cfg.pretrain.learning_rate == 3e-3
    # the rules can be asked on the demo world too
    cfg = load_config(ROOT / "params.yaml", "demo", ["recipe.use_demo_world_values=false"])
    assert "pretrain.max_steps" in recipes.unresolved(cfg)


def test_a_changed_dataset_changes_the_stage_key(tmp_path):
    cfg = load_config(_user_params(tmp_path), "demo")
    a, _ = recipes.resolve(cfg, FACTS)
    b, _ = recipes.resolve(cfg, Facts(**{**FACTS.__dict__, "corpus_tokens": 120_000}))
    c, _ = recipes.resolve(cfg, Facts(**{**FACTS.__dict__, "chats": 1_200}))
    assert b.pretrain.max_steps == 938
    assert stage_key(step("pretrain"), a, None, "d") != stage_key(step("pretrain"), b, None, "d")
    assert c.sft.epochs == 2.2          # 1,200 chats - 120 held out, x 2 with replay: 300 x 16 / 2,160
    assert stage_key(step("sft"), a, None, "d") != stage_key(step("sft"), c, None, "d")


def test_auto_and_bad_values_in_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"'pretrain.max_steps'.*valid integer.*or auto.*'lots'"):
        load_config(p)
    p.write_text("recipe:\n  demo_world: {sft: {epochz: 3}}\n")
    with pytest.raises(ConfigError, match=r"recipe.demo_world.sft.epochz: not a setting that can be auto"):
        load_config(p)
    p.write_text("sft:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"'sft.epochs'.*greater than 0"):
        load_config(p)


@pytest.mark.parametrize("profile", [None, "demo", "smoke", "smollm2"])
def test_every_profile_on_user_data_checkpoints_at_its_evaluations(tmp_path, profile):
    """Early stopping keeps the best checkpoint, so save_steps must be a multiple of eval_steps (the run
    refuses to start otherwise): no profile may pin one and leave the other to the rules — the
    smollm2 profile once pinned sft.save_steps: 100, which a user's sft.max_steps=30 (eval every 3) broke."""
    for steps in (None, "30"):
        over = [] if steps is None else [f"sft.max_steps={steps}"]
        cfg, _ = recipes.resolve(load_config(_user_params(tmp_path), profile, over), FACTS)
        assert cfg.sft.early_stopping_patience, profile   # the rule below is exercised, not skipped
        recipes.check(cfg)


@pytest.mark.parametrize("section", ["pretrain", "sft"])
def test_a_checkpoint_off_the_evaluations_is_refused_before_the_run_naming_both_settings(tmp_path, section):
    over = [f"{section}.early_stopping_patience=2", f"{section}.eval_steps=4", f"{section}.save_steps=6"]
    cfg, _ = recipes.resolve(load_config(_user_params(tmp_path), None, over), FACTS)
    with pytest.raises(ConfigError, match=rf"{section}.save_steps \(6\) must be a multiple of "
                                          rf"{section}.eval_steps \(4\)"):
        recipes.check(cfg)
    fixed, _ = recipes.resolve(load_config(_user_params(tmp_path), None, over[:2] + [f"{section}.save_steps=8"]),
                               FACTS)
    recipes.check(fixed)   # a multiple is fine
    if section == "pretrain":   # unused with a base model: not an error
        based, _ = recipes.resolve(load_config(_user_params(tmp_path), None, over + ["model.base=some/base"]), FACTS)
        recipes.check(based)


def test_a_batch_that_does_not_split_over_the_ray_ranks_and_two_launchers_are_refused_before_the_run(tmp_path):
    """<stage>.resources.num_workers ranks split one optimizer step's batch (stagewise.launch.rank_batch)."""
    cfg, _ = recipes.resolve(load_config(_user_params(tmp_path), None, ["sft.batch_size=16",
                                                                      "sft.resources.num_workers=3"]), FACTS)
    with pytest.raises(ConfigError, match=r"sft.batch_size \(16\) does not split over sft.resources.num_workers \(3\)"):
        recipes.check(cfg)
    ok, _ = recipes.resolve(load_config(_user_params(tmp_path), None, ["sft.resources.num_workers=4"]), FACTS)
    recipes.check(ok)
    both, _ = recipes.resolve(load_config(_user_params(tmp_path), None, ["ops.engine=ray", "train.launcher=accelerate"]),
                              FACTS)
    with pytest.raises(ConfigError, match=r"ops.engine: ray runs the training stages on Ray Train.*train.launcher"):
        recipes.check(both)


def test_where_a_stage_runs_is_not_part_of_its_cache_key(tmp_path):
    """resources place a stage (and split its batch over ranks): the same model within float noise
    (tests/test_ops_ray_train.py), so a model trained on one host is a cache hit on the cluster."""
    base = load_config(_user_params(tmp_path), None, [])
    placed = load_config(_user_params(tmp_path), None, ["sft.resources.num_workers=2", "sft.resources.num_cpus=4",
                                                        "sft.resources.num_gpus=1"])
    other = load_config(_user_params(tmp_path), None, ["sft.batch_size=8"])
    assert stage_key(step("sft"), placed, None, "d") == stage_key(step("sft"), base, None, "d")
    assert stage_key(step("sft"), other, None, "d") != stage_key(step("sft"), base, None, "d")
    assert placed.section_hash("sft") == base.section_hash("sft")
