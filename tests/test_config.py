from pathlib import Path

import pytest

from stagewise.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_validate_for_every_profile():
    base = load_config(ROOT / "params.yaml")
    smoke = load_config(ROOT / "params.yaml", "smoke")
    assert smoke.model.hidden_size < base.model.hidden_size  # the smoke profile really shrinks the model
    assert load_config(ROOT / "params.yaml", "demo").run.registered_model == "stagewise"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("sft:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sft.epochz'"):
        load_config(p)


def test_wrong_type_names_key_and_value(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"'pretrain.max_steps'.*'lots'"):
        load_config(p)


def test_set_overrides_are_typed_and_validated():
    cfg = load_config(ROOT / "params.yaml", "smoke", ["sft.peft=lora", "sft.epochs=1", "quality.gopher_min_words=null"])
    assert (cfg.sft.peft, cfg.sft.epochs, cfg.quality.gopher_min_words) == ("lora", 1.0, None)
    with pytest.raises(ConfigError, match="sft.peft"):
        load_config(ROOT / "params.yaml", None, ["sft.peft=adapters"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(ROOT / "params.yaml", None, ["sft"])


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="defined: .*smoke"):
        load_config(ROOT / "params.yaml", "huge")


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("run:\n  seed: 1\nsft: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+"):
        load_config(p)


def test_section_hash_changes_only_with_its_section():
    a, b = Config(), Config()
    b.sft.epochs = 9
    assert a.section_hash("sft") != b.section_hash("sft")
    assert a.section_hash("pretrain") == b.section_hash("pretrain")


def test_result_storage_is_an_s3_uri_without_credentials():
    """ops.result_storage: keys come from AWS_*; one in the URI is refused, and not echoed back."""
    for bad, why in (("/mnt/results", "s3://bucket/prefix"), ("s3://AKIA:hunter2@bucket/x", "credentials")):
        with pytest.raises(ConfigError) as e:
            load_config(ROOT / "params.yaml", "smoke", [f"ops.result_storage={bad}"])
        assert why in str(e.value) and "ops.result_storage" in str(e.value)
        assert "hunter2" not in str(e.value)
    cfg = load_config(ROOT / "params.yaml", "smoke", ["ops.result_storage=s3://bucket/prefix/"])
    assert cfg.ops.result_storage == "s3://bucket/prefix"
