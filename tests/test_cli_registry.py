"""`stagewise registry | promote | rollback | gate` on a real temp MLflow store with tiny real models."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from eval_fixtures import REPO, benchmark_chats, eval_workspace, make_model, make_tokenizer, memorize, save_model, texts_of
from stagewise.config import EvaluateConfig

runner = CliRunner()


def general_texts(ws) -> list[str]:
    rows = [json.loads(x) for x in (ws.benchmarks / "general_mc.jsonl").read_text().splitlines()]
    text = [json.loads(x)["text"] for x in (ws.benchmarks / "general_text.jsonl").read_text().splitlines()]
    return text + [r["context"] + " " + r["choices"][r["gold"]] for r in rows]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """v1 = random init (stage pretrain); v2 = trained on the instruct answers and general text (sft)."""
    import mlflow
    import torch

    from stagewise import registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = eval_workspace(tmp_path_factory.mktemp("cli") / "ws", n_eval=12)
    shutil.copy(REPO / "params.yaml", ws.root / "params.yaml")
    tok = make_tokenizer(texts_of(ws))
    rand_dir = save_model(make_model(tok, hidden=48), tok, ws.root / "src" / "random")
    model = make_model(tok, hidden=48)
    enc = tok(general_texts(ws), return_tensors="pt", padding=True)
    chats = benchmark_chats(ws, "instruct")
    memorize(model, tok, chats, steps=60, lr=5e-3)
    # general text too, so the candidate does not pay for its target with forgetting
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.train()
    for _ in range(40):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    memorize(model, tok, chats, steps=20, lr=2e-3)
    good_dir = save_model(model, tok, ws.root / "src" / "trained")

    registry.setup_tracking(ws.root)
    versions = {}
    for stage, folder, parent in (("pretrain", rand_dir, "none"), ("sft", good_dir, "1")):
        with mlflow.start_run(run_name=stage) as run:
            pass
        versions[stage] = registry.log_model_version(
            folder, "cli", stage, {"parent_version": parent, "cache_key": f"cli-{stage}"}, run.info.run_id)
    yield ws, rand_dir, good_dir, versions
    torch.set_num_threads(threads)


def cli(ws, *args):
    from stagewise.cli import app

    return runner.invoke(app, [*args, "--config", str(ws.root / "params.yaml"), "--set", "evaluate.bootstrap_iters=200"])


def test_gate_passes_a_real_improvement_and_fails_the_reverse(store):
    from stagewise import registry

    ws, _, good_dir, v = store
    res = cli(ws, "gate", "--candidate", f"models:/cli/{v['sft']}", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["stage"] == "sft" and out["parent"] == "1" and out["gate"]["passed"] is True
    target = next(r for r in out["gate"]["rules"] if r["rule"] == "target_improves")
    assert target["candidate"] > target["baseline"] and target["ci_low"] > 0
    assert registry.version_tags("cli", v["sft"])["gate"] == "passed"

    # The random model against the trained one: its target and its general metrics are worse.
    res = cli(ws, "gate", "--candidate", "models:/cli/1", "--baseline", str(good_dir), "--stage", "sft")
    assert res.exit_code == 1, res.output
    assert res.stdout.startswith("gate: FAILED")
    assert "FAIL target_improves" in res.output and "did not improve" in res.output
    assert registry.version_tags("cli", "1")["gate"] == "failed"


@pytest.mark.parametrize("args, message", [
    (["--candidate", "models:/cli/99"], "no version 99"),
    (["--candidate", "models:/cli@nope"], "no alias 'nope'"),
    (["--candidate", "/no/such/folder"], "neither a model URI"),
])
def test_gate_errors_exit_2_with_the_fix(store, args, message):
    ws, *_ = store
    res = cli(ws, "gate", *args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_a_speed_ratio_measured_on_another_machine_kind_is_flagged(store):
    from stagewise import machine, registry

    ws, _, _, v = store
    here = machine.describe()
    other = dict(here, cpu="Some Other CPU", kind=None)
    c = registry.client()
    c.set_model_version_tag("cli", v["pretrain"], "speed_ratio", "1.06")
    for k, val in machine.tags(machine.describe() | {"kind": machine.kind(other), "cpu": "Some Other CPU"}).items():
        c.set_model_version_tag("cli", v["pretrain"], k, val)
    c.set_model_version_tag("cli", v["sft"], "speed_ratio", "0.84")
    for k, val in machine.tags(here).items():
        c.set_model_version_tag("cli", v["sft"], k, val)
    rows = {r["version"]: r for r in json.loads(cli(ws, "registry", "--name", "cli", "--json").stdout)["versions"]}
    assert rows[v["pretrain"]]["speed_elsewhere"] is True and rows[v["pretrain"]]["speed_ratio"] == 1.06
    assert rows[v["sft"]]["speed_elsewhere"] is False
    out = cli(ws, "registry", "--name", "cli").stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{v['pretrain']} "))
    assert "speed 1.06x the parent's, measured on another machine kind: Some Other CPU" in line
    assert "another machine kind" not in next(ln for ln in out.splitlines() if ln.strip().startswith(f"{v['sft']} "))
    for ver in v.values():
        for k in ("speed_ratio", "speed_machine", "speed_machine_kind"):
            c.delete_model_version_tag("cli", ver, k)


def test_registry_with_an_unknown_name_is_an_error_not_an_empty_list(store):
    ws, *_ = store
    res = cli(ws, "registry", "--name", "clj")
    assert res.exit_code == 2, res.output
    assert "error: no registered model 'clj' in this store (known: cli) — check --name" in res.output
    assert "Traceback" not in res.output


def test_promote_refuses_failed_gate_unless_forced_with_reason_and_rollback(store):
    """Runs after the gate tests (file order): it sets the gate tags itself and then moves aliases."""
    import mlflow
    import torch

    from stagewise import registry
    from stagewise.evaluation import evaluate

    ws, _, good_dir, v = store
    sft, pre = v["sft"], v["pretrain"]
    registry.client().set_model_version_tag("cli", pre, "gate", "failed")
    registry.client().set_model_version_tag("cli", sft, "gate", "passed")

    res = cli(ws, "promote", "--name", "cli", "--version", pre)
    assert res.exit_code == 1 and "refused" in res.output and "its gate failed" in res.output
    assert registry.alias_version("cli", "champion") is None
    res = cli(ws, "promote", "--name", "cli", "--version", pre, "--force")
    assert res.exit_code == 2 and "--reason" in res.output

    assert cli(ws, "promote", "--name", "cli", "--version", sft).exit_code == 0
    res = cli(ws, "promote", "--name", "cli", "--version", pre, "--force", "--reason", "drill: rollback test")
    assert res.exit_code == 0 and "forced" in res.output
    assert registry.alias_version("cli", "champion") == pre
    assert registry.alias_version("cli", "previous-champion") == sft
    assert registry.version_tags("cli", pre)["forced_reason"] == "drill: rollback test"

    res = cli(ws, "rollback", "--name", "cli")
    assert res.exit_code == 0 and f"v{sft}" in res.output
    listing = json.loads(cli(ws, "registry", "--name", "cli", "--json").stdout)
    aliases = {r["version"]: r["aliases"] for r in listing["versions"]}
    assert "champion" in aliases[sft] and "previous-champion" in aliases[pre]

    # The champion, loaded the documented way, scores exactly what the gate saw for that version
    # (and any saved folder scores the same with the lm_eval CLI: test_evaluate.py).
    gated = json.loads(cli(ws, "gate", "--candidate", "models:/cli@champion", "--baseline", "models:/cli/1",
                           "--json").stdout)["gate"]
    seen = {r["metric"]: r["candidate"] for r in gated["rules"] if r["against"] == "parent"}
    comps = mlflow.transformers.load_model("models:/cli@champion", return_type="components")
    folder = ws.root / "champion"
    comps["model"].save_pretrained(folder, safe_serialization=True)
    comps["tokenizer"].save_pretrained(folder)
    fresh = EvaluateConfig(bootstrap_iters=50, cache_dir=".cache/fresh")   # same bytes would hit the cache
    got = evaluate(folder, ["sw_instruct", "sw_general_text"], ws, fresh)
    assert got["sw_instruct"]["cached"] is False
    assert got["sw_instruct"]["token_f1"] == seen["sw_instruct.token_f1"] > 0
    assert got["sw_general_text"]["word_perplexity"] == pytest.approx(seen["sw_general_text.word_perplexity"],
                                                                      rel=1e-5)


def test_the_command_line_gate_applies_the_pipelines_rulebook_base_and_earlier_targets_included(store):
    """Issue 21: `stagewise gate` checked fewer rules than the pipeline's gate for the same version (never
    the base) yet tagged it gate=passed. A preference version over sft over pretrain is judged against its
    parent, the fine-tuning base (the pretrain model) and the sft stage's target, as the pipeline does."""
    import mlflow

    from stagewise import registry

    ws, _, good_dir, v = store
    with mlflow.start_run(run_name="preference") as run:
        pass
    v3 = registry.log_model_version(good_dir, "cli", "preference", {"parent_version": v["sft"]}, run.info.run_id)
    res = cli(ws, "gate", "--candidate", f"models:/cli/{v3}", "--json")
    out = json.loads(res.stdout)
    rules = {(r["rule"], r["against"]) for r in out["gate"]["rules"]}
    assert {("general_ppl_rise", "base"), ("general_no_drop", "base")} <= rules
    assert ("earlier_target_kept", f"sft model v{v['sft']}") in rules
    assert out["fine_tuning_base"] == f"v{v['pretrain']} (pretrain)"
    # the same weights as its parent: the preference target did not improve, so it fails and is tagged so
    assert res.exit_code == 1 and registry.version_tags("cli", v3)["gate"] == "failed"
