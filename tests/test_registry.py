"""Registry semantics on a real (temp, SQLite) MLflow store with a real tiny model."""

from pathlib import Path

import pytest

from stagewise import registry
from stagewise.config import GenerateConfig, ModelConfig, TokenizerConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    registry.setup_tracking(root)
    from tasks.generate import generate
    from tasks.tokenizer import train_tokenizer
    from stagewise.modeling import build_model, load_tokenizer, save_model

    generate(GenerateConfig(n_docs=30, n_junk=2, n_exact_dup=1, n_near_dup=1, n_leaks=1, n_chat=20,
                            n_preference=10, n_verifiable=10, n_eval=5), root / "raw")
    train_tokenizer(TokenizerConfig(vocab_size=300), root / "raw", root / "tok")
    tok = load_tokenizer(root / "tok")
    model = build_model(ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1), tok)
    save_model(model, tok, root / "model")
    return root


def _register(store: Path, name: str, stage: str, key: str) -> str:
    import mlflow

    with mlflow.start_run(run_name=stage) as run:
        pass
    return registry.log_model_version(store / "model", name, stage,
                                      {"parent_version": "none", "data_hash": "d1", "config_hash": "c1",
                                       "code_version": "test", "cache_key": key}, run.info.run_id)


def test_lineage_tags_and_cache_lookup(store):
    v = _register(store, "reg-a", "sft", "key-1")
    tags = registry.version_tags("reg-a", v)
    assert {tags[k] for k in ("stage", "data_hash", "config_hash", "code_version")} == {"sft", "d1", "c1", "test"}
    assert registry.find_cached_version("reg-a", "sft", "key-1")["version"] == v
    assert registry.find_cached_version("reg-a", "sft", "key-2") is None       # other inputs: no hit
    assert registry.find_cached_version("reg-a", "pretrain", "key-1") is None  # other stage: no hit


def test_champion_moves_only_on_pass_and_rolls_back(store):
    v1 = _register(store, "reg-b", "sft", "k1")
    v2 = _register(store, "reg-b", "sft", "k2")
    v3 = _register(store, "reg-b", "sft", "k3")
    assert registry.promote("reg-b", v1, gate_passed=True)
    assert registry.alias_version("reg-b", registry.CHAMPION) == v1
    assert not registry.promote("reg-b", v2, gate_passed=False)               # failing gate: no move
    assert registry.alias_version("reg-b", registry.CHAMPION) == v1
    assert registry.version_tags("reg-b", v2)["gate"] == "failed"
    assert registry.promote("reg-b", v3, gate_passed=True)
    assert registry.alias_version("reg-b", registry.CHAMPION) == v3
    assert registry.alias_version("reg-b", registry.PREVIOUS) == v1
    assert registry.rollback("reg-b") == v1
    assert registry.alias_version("reg-b", registry.CHAMPION) == v1


def test_forced_promotion_records_the_reason(store):
    v = _register(store, "reg-c", "sft", "k")
    assert registry.promote("reg-c", v, gate_passed=False, force_reason="hotfix approved by on-call")
    tags = registry.version_tags("reg-c", v)
    # a forced promotion adds its own record; the (missing) gate verdict is not overwritten
    assert (tags.get("gate"), tags["forced"], tags["forced_reason"]) == (None, "true", "hotfix approved by on-call")


def test_champion_loads_through_mlflow_and_matches_weights(store, tmp_path):
    import mlflow
    import torch

    from stagewise.modeling import load_model

    v = _register(store, "reg-d", "sft", "k")
    registry.promote("reg-d", v, gate_passed=True)
    comps = mlflow.transformers.load_model("models:/reg-d@champion", return_type="components")
    ref = load_model(store / "model")
    for (n, a), (_, b) in zip(ref.state_dict().items(), comps["model"].state_dict().items()):
        assert torch.equal(a, b.float()), n
    out = registry.download_model("reg-d", v, tmp_path / "champ")
    assert (out / "model.safetensors").exists()


def test_nf4_folder_registers_and_downloads_as_the_same_quantized_model(store, tmp_path):
    """transformers 5 cannot re-save a model loaded from bitsandbytes 4-bit weights unaided
    (`registry.resaveable`): the version logs, loads 4-bit through MLflow and downloads byte-identical."""
    import mlflow
    import torch

    from stagewise.compression.measure import load_candidate
    from stagewise.compression.quantize import quantize_bnb
    from stagewise.modeling import build_model, load_tokenizer, save_model

    # bitsandbytes' CPU 4-bit kernel needs layer widths that are multiples of its block: 64, not 16
    tok = load_tokenizer(store / "model")
    save_model(build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                                       num_kv_heads=1), tok), tok, tmp_path / "fp32")
    nf4 = tmp_path / "nf4"
    quantize_bnb(tmp_path / "fp32", nf4, "nf4")
    with mlflow.start_run(run_name="compress") as run:
        pass
    v = registry.log_model_version(nf4, "reg-q", "compress", {"compression": "nf4"}, run.info.run_id)
    assert registry.version_tags("reg-q", v)["compression"] == "nf4"
    comps = mlflow.transformers.load_model(f"models:/reg-q/{v}", return_type="components")
    assert type(comps["model"].model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # the pyfunc flavour (stagewise/serving.py: what `mlflow models serve` loads) is the same 4-bit model
    served = mlflow.pyfunc.load_model(f"models:/reg-q/{v}")
    assert type(served.get_raw_model().model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    from tests.tool_fixtures import TOOLS

    answer = served.predict({"messages": [{"role": "user", "content": "What does the fox eat?"}], "tools": TOOLS[:1],
                             "max_tokens": 4})
    assert answer[0]["object"] == "chat.completion" and 0 < answer[0]["usage"]["completion_tokens"] <= 4
    with pytest.raises(NotImplementedError):       # why docs/evaluation.md says resaveable / stagewise download
        comps["model"].save_pretrained(tmp_path / "bare", safe_serialization=True)
    out = registry.download_model("reg-q", v, tmp_path / "dl")
    assert (out / "model.safetensors").read_bytes() == (nf4 / "model.safetensors").read_bytes()
    # the documented command (docs/evaluation.md): the same folder
    import shutil

    from typer.testing import CliRunner

    from stagewise.cli import app

    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", store / "params.yaml")
    res = CliRunner().invoke(app, ["download", f"models:/reg-q/{v}", str(tmp_path / "cli"),
                                   "--config", str(store / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (nf4 / "model.safetensors").read_bytes()
    assert (tmp_path / "cli" / "tokenizer.json").exists()
    res = CliRunner().invoke(app, ["download", "models:/reg-q@nope", str(tmp_path / "x"),
                                   "--config", str(store / "params.yaml")])
    assert res.exit_code == 2 and "error: models:/reg-q@nope: registered model 'reg-q' has no alias 'nope'" \
        in res.output and not (tmp_path / "x").exists()
    x = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(load_candidate(out)(x).logits, load_candidate(nf4)(x).logits)


def test_a_lora_stage_registers_its_adapter_folder_with_the_base_named(store, tmp_path):
    """PEFT adapter beside the merged model: logged as run artifacts, base version in the tags, reloadable."""
    import shutil

    import mlflow
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from stagewise.modeling import load_model

    folder = tmp_path / "sft"
    shutil.copytree(store / "model", folder)
    peft = get_peft_model(load_model(folder), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)   # a non-trivial adapter
    peft.save_pretrained(folder / registry.ADAPTER_DIR)
    (folder / "stage_info.json").write_text('{"peft": "qlora"}')
    with mlflow.start_run(run_name="sft") as run:
        v = registry.log_model_version(folder, "reg-lora", "sft", {"parent_version": "7"}, run.info.run_id)
    tags = registry.version_tags("reg-lora", v)
    assert tags["adapter_uri"] == f"runs:/{run.info.run_id}/sft-adapter" and tags["adapter_format"] == "peft"
    assert tags["adapter_base_version"] == "7" and tags["adapter_peft"] == "qlora"
    got = Path(mlflow.artifacts.download_artifacts(tags["adapter_uri"], dst_path=str(tmp_path / "dl")))
    reloaded = PeftModel.from_pretrained(load_model(store / "model"), got)
    want = dict(peft.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in reloaded.named_parameters() if "lora_" in n)
