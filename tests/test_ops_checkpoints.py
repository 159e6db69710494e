"""Crash safety of resumes: a stage resumes only from checkpoints that a killed run of the *same*
inputs (same cache key) left behind; anything else is discarded before training starts."""

from __future__ import annotations

from stagewise.modeling import checkpoint_dir, last_checkpoint
from stagewise.stage import claim_checkpoints


def fake_checkpoint(out_dir, step: int) -> None:
    d = checkpoint_dir(out_dir) / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text("{}")


def test_checkpoints_of_the_same_inputs_are_kept_for_the_resume(tmp_path):
    out = tmp_path / "models" / "sft"
    assert claim_checkpoints(out, "key-a") is False          # first attempt: nothing to resume
    fake_checkpoint(out, 20)                                 # ... killed after step 20
    assert claim_checkpoints(out, "key-a") is True           # same inputs: resume
    assert last_checkpoint(checkpoint_dir(out))[1] == 20


def test_checkpoints_of_other_inputs_are_discarded(tmp_path):
    out = tmp_path / "models" / "sft"
    claim_checkpoints(out, "key-a")
    fake_checkpoint(out, 20)
    assert claim_checkpoints(out, "key-b") is False          # params changed since the kill
    assert last_checkpoint(checkpoint_dir(out)) == (None, None)
    assert (checkpoint_dir(out) / "cache_key").read_text() == "key-b"


def test_unmarked_checkpoints_are_discarded(tmp_path):
    out = tmp_path / "models" / "sft"
    fake_checkpoint(out, 10)                                 # left by a version without markers
    assert claim_checkpoints(out, "key-a") is False
    assert last_checkpoint(checkpoint_dir(out)) == (None, None)


def test_a_checkpoint_cut_off_mid_save_is_dropped_and_the_previous_one_resumes(tmp_path):
    out = tmp_path / "models" / "sft"
    claim_checkpoints(out, "key-a")
    fake_checkpoint(out, 20)
    half = checkpoint_dir(out) / "checkpoint-25"              # killed while HF wrote it: no trainer state
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    cut = checkpoint_dir(out) / "checkpoint-30"               # ... or with a truncated one
    cut.mkdir()
    (cut / "trainer_state.json").write_text('{"global_step": 3')
    assert claim_checkpoints(out, "key-a") is True
    assert last_checkpoint(checkpoint_dir(out))[1] == 20
    assert not half.exists() and not cut.exists()
