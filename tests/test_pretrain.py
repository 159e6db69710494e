"""pretrain: held-out perplexity drops, MoE and char variants train, a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from stage_fixtures import ROOT, SMOKE_SETS, curated, pretrained, smoke_cfg, tokenizer_dir
from tasks.pretrain import pretrain
from tasks.tokenizer import train_tokenizer


def test_pretrain_lowers_heldout_perplexity():
    out, res = pretrained()
    assert res["heldout_ppl"] < 0.2 * res["heldout_ppl_before"]     # vs the untrained model
    assert res["train_metrics"]["eval_loss"] < res["train_metrics"]["first_loss"]
    assert res["steps"] == smoke_cfg().pretrain.max_steps and res["resumed_from_step"] is None
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out.parent / "pretrain.checkpoints").exists()       # removed after success
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_moe_with_char_tokenizer(tmp_path):
    cfg = smoke_cfg("tokenizer.kind=char", "model.architecture=moe", "pretrain.max_steps=40",
                    "pretrain.eval_steps=40", "pretrain.save_steps=1000", "pretrain.heldout_limit=10")
    train_tokenizer(cfg.tokenizer, curated(), tmp_path / "tok")
    res = pretrain(cfg, tmp_path / "tok", curated(), tmp_path / "moe")
    assert res["params_active"] < res["params"]
    assert res["heldout_ppl"] < 0.5 * res["heldout_ppl_before"]
    assert res["tokens_per_s"] > 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "moe").config.model_type == "mixtral"


KILLABLE = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from stage_fixtures import smoke_cfg
from tasks.pretrain import pretrain
cfg = smoke_cfg("pretrain.save_steps=10", "pretrain.max_steps=60")
pretrain(cfg, Path({tok!r}), Path({cur!r}), Path({out!r}))
"""


def test_killed_pretrain_resumes_from_checkpoint(tmp_path):
    out = tmp_path / "pretrain"
    ckpts = tmp_path / "pretrain.checkpoints"
    code = KILLABLE.format(tests=str(ROOT / "tests"), tok=str(tokenizer_dir()), cur=str(curated()), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if any((c / "trainer_state.json").exists() for c in ckpts.glob("checkpoint-*")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before a checkpoint could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()                                   # killed: nothing half-published
    saved = max(json.loads((c / "trainer_state.json").read_text())["global_step"]
                for c in ckpts.glob("checkpoint-*") if (c / "trainer_state.json").exists())
    assert saved >= 10

    res = pretrain(smoke_cfg("pretrain.save_steps=10", "pretrain.max_steps=60"), tokenizer_dir(), curated(), out)
    assert res["resumed_from_step"] >= 10
    assert res["steps"] == 60 and res["steps_run"] == 60 - res["resumed_from_step"]
    assert res["heldout_ppl"] < 0.2 * res["heldout_ppl_before"]
    assert not ckpts.exists()
