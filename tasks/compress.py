"""compress — make the parent model smaller, measure every candidate, keep the best that is still good.

Recipe, top to bottom:
1. measure and evaluate the parent (the yardstick for every ratio and every delta);
2. for each entry in `compress.methods` write a candidate folder under out_root/<entry>/:
   nf4 / int8 (bitsandbytes), dynamic_int8 (PyTorch), prune_magnitude / prune_2of4 (masks, optional
   recovery fine-tune, made permanent), prune_structured (a smaller dense Llama + recovery),
   distill (a student cut from the teacher, trained on (1-λ)CE + λT²KL), merge (mergekit, with
   checkpoints that share the parent's base); an entry may be a chain (`distill+nf4`), each link
   compressing the previous link's output;
3. measure (params, bytes on disk, memory footprint, tokens/s at batch 1 and batched) and evaluate
   each candidate from its folder, the way the registry and the gate will reload it;
4. select on accuracy, size and latency together (stagewise/compression/select.py, `compress.select`);
5. report: out_root/compress.json, a markdown table and the Pareto plot (size × tokens/s, task
   metric as colour) at out_root/pareto.png.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from prefect import task

from stagewise import machine
from stagewise.compression import distill as distill_mod
from stagewise.compression import prune, quantize
from stagewise.compression.data import curated_texts, lm_blocks, task_examples
from stagewise.compression.measure import load_candidate, measure, quiet_bnb_warnings, sparsity, tokens_per_s
from stagewise.compression.quantize import RECIPE
from stagewise.compression.select import check, lower_is_better, select, task_metric_of
from stagewise.config import Config, StepConfig, hash_obj
from stagewise.rulebook import Rulebook, describe
from stagewise.stage import Lineage, RunContext, compress_key, eval_tasks_dir, fine_tuning_base, flat_params
from stagewise.workspace import Workspace
from tasks import step

log = logging.getLogger("stagewise")

__all__ = ["builtin_evaluator", "check", "compress", "compress_task", "select"]


# ---------------------------------------------------------------- built-in check (no evaluate_fn)
def builtin_evaluator(cfg: Config, ws: Workspace) -> Callable[..., dict]:
    """Held-out NLL on the benchmarks: `task_nll` (instruct answers via the chat template) and
    `general_nll` (general text). A quick standalone check; the flow passes stagewise/evaluation.py."""
    from stagewise.modeling import benchmarks_dir, load_tokenizer, mean_nll, read_jsonl

    bdir = benchmarks_dir(ws.curated)
    if bdir is None:
        raise FileNotFoundError(f"{ws.benchmarks}: no benchmarks for the built-in check — run `generate`, "
                                "or pass evaluate_fn")
    n = cfg.compress.eval_texts
    general = [r["text"] for r in read_jsonl(bdir / "general_text.jsonl", ["text"])][:n]
    instruct = read_jsonl(bdir / "instruct.jsonl", ["question", "answer"])[:n]

    def evaluate(model_dir: Path, model=None) -> dict:
        tok = load_tokenizer(model_dir)
        model = model if model is not None else load_candidate(model_dir)
        chats = [tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                          {"role": "assistant", "content": r["answer"]}], tokenize=False)
                 for r in instruct]
        return {"task_nll": round(mean_nll(model, tok, chats), 5), "general_nll": round(mean_nll(model, tok, general), 5)}

    return evaluate



def _call_evaluate(evaluate_fn: Callable, model_dir: Path, model, recipe: bool) -> dict:
    """Score a candidate the way it will be loaded: HF folders from the folder (what the registry and
    the gate reload), recipe candidates (dynamic int8) in memory, when the evaluator takes a model."""
    if not recipe:
        return evaluate_fn(model_dir)
    if "model" in inspect.signature(evaluate_fn).parameters:
        return evaluate_fn(model_dir, model=model)
    return {}  # the folder alone cannot be loaded by a plain HF evaluator: not selectable, said in the report


def reload_error(model_dir: Path) -> str | None:
    """Why this folder cannot ship (None: it reloads with `from_pretrained`, as the registry and gate load it)."""
    from stagewise.modeling import load_model

    if (Path(model_dir) / RECIPE).exists():
        return "recipe folder (no safetensors form): only load_candidate() rebuilds it, the registry cannot load it"
    try:
        load_model(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure to reload means it cannot ship
        return f"does not reload with from_pretrained ({type(e).__name__}: {e})"
    return None


# ---------------------------------------------------------------- report
def pareto_plot(cfg: Config, parent: dict, candidates: list[dict], sel: dict, task_metric: str | None,
                path: Path) -> Path | None:
    """Size × tokens/s, colour = task metric; the size × speed Pareto front dashed; ineligible as x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size_by, speed_by = cfg.compress.select.size_by, cfg.compress.select.speed_by
    rows = [parent] + [c for c in candidates if "error" not in c]
    if len(rows) < 2:
        return None
    scale = 1e3 if size_by == "params" else 1e6
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    vals = [r.get("metrics", {}).get(task_metric) for r in rows]
    known = [v for v in vals if isinstance(v, (int, float))]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    cmap = plt.get_cmap("viridis_r" if task_metric and lower_is_better(task_metric) else "viridis")
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    for r, v in zip(rows, vals):
        x, y = r[size_by] / scale, r[speed_by]
        colour = cmap(norm(v)) if isinstance(v, (int, float)) else "lightgray"
        eligible = r is parent or r.get("eligible")
        ax.scatter([x], [y], s=120, c=[colour], marker="o" if eligible else "X", edgecolors="k",
                   linewidths=2.5 if r["method"] == sel.get("chosen") else 0.8, zorder=3)
        label = r["method"] + (" (chosen)" if r["method"] == sel.get("chosen") else "")
        ax.annotate(label, (x, y), fontsize=7, xytext=(5, 4), textcoords="offset points")
    front = sorted((r[size_by] / scale, r[speed_by]) for r in rows if r["method"] in sel.get("front", []))
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="gray", lw=1, label="Pareto front (size × speed)", zorder=2)
        ax.legend(fontsize=8, loc="lower right")
    floor = parent[speed_by] * cfg.compress.select.min_speed_ratio
    if floor > 0:
        ax.axhline(floor, color="tab:red", lw=0.8, ls=":")
        ax.annotate(f"min_speed_ratio {cfg.compress.select.min_speed_ratio:g}x", (ax.get_xlim()[0], floor),
                    fontsize=7, color="tab:red", xytext=(2, 2), textcoords="offset points")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=task_metric or "task metric")
    ax.set_xlabel({"memory_bytes": "memory footprint (MB)", "bytes": "weights on disk (MB)",
                   "params": "parameters (k)"}[size_by])
    ax.set_ylabel({"tokens_per_s": "tokens/s (batch 1)", "tokens_per_s_batched": "tokens/s (batched)"}[speed_by])
    ax.set_title("compress: thick edge = chosen, X = not eligible, dotted = speed floor", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(parent: dict, candidates: list[dict], chosen: str | None, size_by: str = "memory_bytes",
          speed_by: str = "tokens_per_s") -> str:
    """Markdown table: sizes and speed as ratios vs the parent, metric values, eligible or why not."""
    head = ("| method | params | MB on disk | MB in memory | tokens/s (b1) | tokens/s (batched) | size ratio | "
            "speed ratio | metrics | eligible |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def row(r, ref):
        if "error" in r:
            return f"| {r['method']} | — | — | — | — | — | — | — | {r['error']} | no |\n"
        mark = " **(chosen)**" if r["method"] == chosen else ""
        ratio = ref[size_by] / max(r[size_by], 1)
        speed = r[speed_by] / max(ref[speed_by], 1e-9)
        mets = ", ".join(f"{k}={v:.4g}" for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float)))
        ok = "—" if r is ref else ("yes" if r.get("eligible") else "no: " + "; ".join(r.get("failed", [])))
        return (f"| {r['method']}{mark} | {r['params']:,} | {r['bytes'] / 1e6:.2f} | {r['memory_bytes'] / 1e6:.2f} | "
                f"{r['tokens_per_s']:.1f} | {r.get('tokens_per_s_batched', 0):.1f} | {ratio:.2f}x | {speed:.2f}x | "
                f"{mets} | {ok} |\n")

    return head + row(parent, parent) + "".join(row(c, parent) for c in candidates)


# ---------------------------------------------------------------- the step
def compress(cfg: Config, parent_dir: Path, ws: Workspace, out_root: Path,
             evaluate_fn: Callable[[Path], dict] | None = None,
             merge_with: list[Path] | None = None,
             check_fn: Callable[[Path, dict], dict] | None = None, task_metric: str | None = None) -> dict:
    """Write, measure and evaluate one candidate per entry (a method or a chain); pick one. See the module docstring.

    `check_fn(folder, metrics)`: the accuracy check of a candidate (the pipeline passes the gate's rulebook);
    without it, `check` on the flat metrics. `task_metric`: the metric ties and the report read (the gate's
    target; default: the first non-general metric)."""
    from stagewise.modeling import load_model, load_tokenizer, save_model, use_bf16

    c = cfg.compress
    quiet_bnb_warnings()
    torch.set_num_threads(max(1, cfg.run.threads))
    parent_dir, out_root = Path(parent_dir), Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    evaluate = evaluate_fn or builtin_evaluator(cfg, ws)
    tok = load_tokenizer(parent_dir)
    bf16 = use_bf16(cfg.train)
    seed = cfg.run.seed

    parent_model = load_model(parent_dir).eval()
    parent = {"method": "parent", "model_dir": str(parent_dir), **measure(parent_model, parent_dir),
              "metrics": _call_evaluate(evaluate, parent_dir, parent_model, False)}
    print(f"[compress] parent: {parent['params']:,} params, {parent['memory_bytes'] / 1e6:.2f} MB, "
          f"{parent['metrics']}", flush=True)

    _texts: list[str] = []

    def blocks(n: int, seq_len: int) -> torch.Tensor:
        if not _texts:
            _texts.extend(curated_texts(ws, tok, seed=seed))
        return lm_blocks(tok, _texts, seq_len, max_blocks=n)

    def train_data(kind: str, n: int, seq_len: int):
        return blocks(n, seq_len) if kind == "text" else task_examples(ws, tok, n, seq_len, seed=seed)

    def work(name: str) -> Path:
        return out_root / ".work" / name

    def build(method: str, src_dir: Path, src_model, out: Path, name: str):
        """One link: compress `src` (folder + loaded model) with `method` into `out`.
        Returns (model, folder, info, is_recipe_folder)."""
        p = c.prune
        if method in ("nf4", "int8"):
            m, kept = quantize.quantize_bnb(src_dir, out, method, c.quantize.nf4_double_quant, c.quantize.skip_modules)
            return m, out, {"quantization": method} | ({"full_precision_layers": kept} if kept else {}), False
        if method == "dynamic_int8":
            return quantize.quantize_dynamic_int8(src_dir, out), out, {"quantization": "torch.ao dynamic int8"}, True
        if method in ("prune_magnitude", "prune_2of4", "prune_structured"):
            model = load_model(src_dir)
            if method == "prune_magnitude":
                model = prune.magnitude_prune(model, p.sparsity)
            elif method == "prune_2of4":
                model = prune.two_four_prune(model)
            else:
                model = prune.structured_prune(model, blocks(p.calibration_texts, p.seq_len), p.mlp_fraction,
                                               p.kv_group_fraction, p.layer_fraction)
            rec = train_data(p.recovery_data, p.recovery_steps * p.batch_size, p.seq_len) if p.recovery_steps > 0 else None
            model, info = distill_mod.recover(model, rec, p.recovery_steps, p.recovery_learning_rate, p.batch_size,
                                              seed, bf16, work(name), teacher=src_model,
                                        temperature=p.recovery_temperature, alpha=p.recovery_alpha,
                                        pad_id=tok.pad_token_id)
            info["recovery_data"] = p.recovery_data
            model = prune.make_permanent(model)
            info["sparsity"] = round(sparsity(model), 4)
            if method == "prune_structured":
                info |= {"num_layers": model.config.num_hidden_layers,
                         "intermediate_size": model.config.intermediate_size,
                         "num_attention_heads": model.config.num_attention_heads,
                         "num_key_value_heads": model.config.num_key_value_heads}
            save_model(model, tok, out, info={"method": method, "parent": str(src_dir), **info})
            return model, out, info, False
        if method == "distill":
            d = c.distill
            student, info = distill_mod.distill(
                src_model, train_data(d.data, max(d.steps, 1) * d.batch_size, d.seq_len), pad_id=tok.pad_token_id,
                depth_factor=d.depth_factor, width_factor=d.width_factor, mlp_factor=d.mlp_factor, init=d.init,
                steps=d.steps, lr=d.learning_rate, batch_size=d.batch_size, temperature=d.temperature,
                alpha=d.alpha, seed=seed, bf16=bf16, work_dir=work(name),
                calib_blocks=blocks(c.prune.calibration_texts, d.seq_len))
            info["data"] = d.data
            save_model(student, tok, out, info={"method": method, "parent": str(src_dir), **info})
            return student, out, info, False
        if method == "merge":
            from stagewise.compression.merge import TASK_VECTOR_METHODS, merge_models

            mg = c.merge
            others = [Path(x) for x in merge_with] if merge_with is not None else \
                [ws.model_dir(s) for s in mg.with_stages if ws.model_dir(s).resolve() != src_dir.resolve()]
            others = [o for o in others if (o / "config.json").exists()]
            if not others:
                raise _Skip(f"nothing to merge with (compress.merge.with_stages={mg.with_stages} not found under "
                            f"{ws.root / 'models'}, and no merge_with passed)")
            base = ws.model_dir(mg.base_stage) if mg.method in TASK_VECTOR_METHODS else None
            if base is not None and not (base / "config.json").exists():
                raise _Skip(f"{base}: merge base missing (compress.merge.base_stage={mg.base_stage!r})")
            models = [src_dir] + others
            if mg.method == "slerp":
                models = models[:2]
            merge_models(mg.method, models, out, base=base, weights=mg.weights, density=mg.density, t=mg.t, seed=seed)
            return load_model(out).eval(), out, {"merge_method": mg.method, "models": [str(m) for m in models],
                                                  "base": str(base) if base else None}, False
        raise ValueError(f"compress.methods: unknown method {method!r}")

    # A chain's links run in order, each from the previous link's output; a prefix already built (an
    # entry of its own, or an earlier chain's) is reused from its folder, not built twice.
    built: dict[str, tuple[Path, dict, bool]] = {}

    def run(entry: str):
        """Returns (model, folder, info, is_recipe_folder) of one entry; a chain's info lists its links."""
        links = entry.split("+")
        src_dir, src_model, steps = parent_dir, parent_model, []
        for i, method in enumerate(links):
            name = "+".join(links[: i + 1])
            if name in built:
                folder, info, recipe = built[name]
                model = load_candidate(folder)
                steps.append({"link": method, "from": str(src_dir), "to": str(folder), "reused": True, "info": info})
            else:
                model, folder, info, recipe = build(method, src_dir, src_model, out_root / name, name)
                built[name] = (folder, info, recipe)
                steps.append({"link": method, "from": str(src_dir), "to": str(folder), "info": info})
            src_dir, src_model = folder, model
        if len(links) == 1:
            return model, folder, dict(info), recipe
        return model, folder, {**info, "chain": links, "links": steps}, recipe

    candidates = []
    for entry in c.methods:
        print(f"[compress] {entry} ...", flush=True)
        try:
            model, folder, info, recipe = run(entry)
        except _Skip as e:
            candidates.append({"method": entry, "model_dir": None, "error": f"skipped: {e}", "parent": str(parent_dir)})
            print(f"[compress] {entry} skipped: {e}", flush=True)
            continue
        row = {"method": entry, "model_dir": str(folder), **measure(model, folder),
               "metrics": _call_evaluate(evaluate, folder, model, recipe), "info": info, "parent": str(parent_dir)}
        if recipe and not row["metrics"]:
            row["info"]["note"] = "evaluate_fn takes only a folder; this recipe candidate needs load_candidate()"
        why = reload_error(folder)
        row["reloadable"] = why is None
        if why:
            row["reload_error"] = why
        row["check"] = (check_fn(folder, row["metrics"]) if check_fn is not None
                        else check(cfg, parent["metrics"], row["metrics"]))
        candidates.append(row)
        print(f"[compress] {entry}: {row['params']:,} params, {row['memory_bytes'] / 1e6:.2f} MB, "
              f"{row['metrics']}", flush=True)
        del model
        gc.collect()

    # Speed last, all models timed interleaved (fair under a shared CPU's varying load), each reloaded
    # from its folder — which also proves every candidate folder reloads. Batch 1 is the latency a chat
    # user sees; the batched figure is throughput (compress.gen_batch_size).
    measured = [r for r in candidates if "error" not in r]
    models = {"parent": parent_model} | {r["method"]: load_candidate(Path(r["model_dir"])) for r in measured}
    speed = tokens_per_s(models, c.gen_tokens, c.gen_repeats)
    batched = tokens_per_s(models, c.gen_tokens, max(1, c.gen_repeats // 2), batch_size=c.gen_batch_size)
    for r in [parent] + measured:
        r["tokens_per_s"], r["tokens_per_s_batched"] = speed[r["method"]], batched[r["method"]]
        r["speed_ratio"] = round(speed[r["method"]] / max(speed["parent"], 1e-9), 3)
        r["speed_ratio_batched"] = round(batched[r["method"]] / max(batched["parent"], 1e-9), 3)
    del models
    gc.collect()
    shutil.rmtree(out_root / ".work", ignore_errors=True)  # Trainer scratch dirs (no checkpoints are kept)
    sel = select(cfg, parent, candidates, task_metric)
    chosen, reason = sel["chosen"], sel["reason"]
    task_metric = task_metric or task_metric_of(cfg, parent["metrics"])
    plot = pareto_plot(cfg, parent, candidates, sel, task_metric, out_root / "pareto.png")
    md = table(parent, candidates, chosen, c.select.size_by, c.select.speed_by)
    result = {"candidates": candidates, "chosen": chosen, "reason": reason, "parent_measure": parent,
              "runner_up": sel["runner_up"], "ranking": sel["ranking"], "front": sel["front"],
              "objective": sel["objective"], "task_metric": task_metric,
              "chosen_dir": next((r["model_dir"] for r in measured if r["method"] == chosen), None),
              "plot": str(plot) if plot else None, "table": md,
              "machine": machine.describe()}   # what the tokens/s above were measured on
    (out_root / "compress.md").write_text(f"# compress\n\nchosen: {chosen}\n\n{reason}\n\n{md}")
    (out_root / "compress.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"[compress] chosen: {chosen} — {reason}", flush=True)
    return result


class _Skip(Exception):
    """A method that cannot run with what exists (e.g. no checkpoints to merge): recorded, not fatal."""


@task(name="compress")
def compress_task(ctx: RunContext, cfg: Config, lineage: list[Lineage]) -> dict:
    """Quantize, prune, distill and merge the final model; measure, evaluate, pick one, register it."""
    return run_compress(ctx, cfg, lineage)


def run_compress(ctx: RunContext, cfg: Config, lineage: list[Lineage]) -> dict[str, Any]:
    """Compress the final trained model (`compress` above), evaluated with the gate's own evals.

    Cached on (compress config, parent cache key, compression code). Every candidate's numbers go to an
    MLflow run `compress` (table, Pareto plot); the chosen one is registered as a model version tagged
    `compression=<entry>`, `parent_version` = `uncompressed_version` = the uncompressed model's version:
    the model the gate judges next (`shipped` in the result).
    """
    import mlflow

    from stagewise import registry
    from stagewise.evalsets import plan
    from stagewise.evaluation import evaluate
    from stagewise.hashing import dir_hash

    parent = lineage[-1]
    out_root = ctx.ws.model_dir("compress")
    evals = plan(cfg, ctx.root)
    # the candidates are judged on the eval sets' contents too (their paths and kinds are in `evaluate`)
    key = compress_key(step("compress"), cfg, parent, evals.describe())
    marker, result_file = out_root / "cache_key", out_root / "compress.json"
    if not ctx.forced("compress") and marker.exists() and marker.read_text() == key and result_file.exists():
        result = json.loads(result_file.read_text())
        return _compress_summary(result, cached=True, parent=parent)

    eval_tasks = evals.stage_tasks(parent.stage)
    tasks_dir = eval_tasks_dir(cfg, ctx.root)
    # check() guards every metric whose name says *general*: name the declared general sets so
    general_tasks = {g.task for g in evals.general}

    full: dict[str, dict] = {}    # evaluate() results per folder, with per-item scores: what the rulebook reads

    def evaluate_fn(model_dir: Path, model=None) -> dict:
        res = evaluate(Path(model_dir), eval_tasks, ctx.ws, cfg.evaluate, model=model, tasks_dir=tasks_dir)
        full[str(model_dir)] = res
        return {f"{'general:' if t in general_tasks and 'general' not in t else ''}{t}/{m}": v
                for t, d in res.items() for m, v in d.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and m != "n" and not m.endswith("_stderr")}

    # A candidate is eligible only if the gate's own rules pass on it: the target vs the training parent,
    # its compression cost vs the uncompressed model, the general rules vs the uncompressed model and the
    # base, the earlier stages' targets — the same metrics, limits and statistics the gate applies.
    book = Rulebook.of(cfg, evals)
    base = fine_tuning_base(lineage)
    guards = book.guards_for(parent.stage, lineage[1:-1])
    target = evals.targets.get(parent.stage)

    def check_fn(model_dir: Path, metrics: dict) -> dict:
        res = full.get(str(model_dir))
        if res is None:
            return {"task_metric": target and target.label, "passed": False, "failed": ["not evaluated"], "deltas": {}}
        verdict = book.judge(parent.stage, res, parent=parent.parent_metrics, base=base[1] if base else None,
                             uncompressed=parent.metrics, guards=guards)
        return {"task_metric": target and target.label, "passed": verdict.passed,
                "failed": [describe(r) for r in verdict.failed()],
                "deltas": {f"{r['metric']} vs {r['against']}": {r["unit"]: round(r["delta"], 4)}
                           for r in verdict.rules if r["delta"] is not None}}

    t0 = time.time()
    with mlflow.start_run(run_name="compress", nested=ctx.mlflow_run_id is not None,
                          parent_run_id=ctx.mlflow_run_id) as run:
        mlflow.set_tags({"stage": "compress", "pipeline_run": ctx.run_id, "parent_version": parent.version or ""})
        mlflow.log_params(flat_params("compress", cfg.compress.model_dump(mode="json")))
        result = compress(StepConfig(cfg, "compress", step("compress").reads), Path(parent.model_dir), ctx.ws,
                          out_root, evaluate_fn, check_fn=check_fn,
                          task_metric=f"{target.task}/{target.metric}" if target else None)
        for c in result["candidates"]:
            for k in ("params", "bytes", "memory_bytes", "tokens_per_s", "tokens_per_s_batched", "speed_ratio"):
                if isinstance(c.get(k), (int, float)):
                    # MLflow metric names take no '+': a chain distill+nf4 logs as distill-then-nf4
                    mlflow.log_metric(f"{c['method'].replace('+', '-then-')}.{k}", float(c[k]))
        mlflow.log_text(result.get("table") or "", "compress.md")
        if result.get("plot"):
            mlflow.log_artifact(result["plot"])
        version, errors, registered = None, {}, []
        # The chosen candidate and the runner-up become model versions (the gate falls back to the
        # runner-up when the choice fails); one MLflow cannot log cannot ship, and the next in the
        # policy's ranking is tried.
        by = {c["method"]: c for c in result["candidates"]}
        for method in result.get("ranking") or []:
            if len(registered) == 2:
                break
            folder = Path(by[method]["model_dir"])
            try:
                version = registry.log_model_version(
                    folder, ctx.registered_model, "compress",
                    lineage={"parent_version": parent.version or "none", "compression": method,
                             "uncompressed_version": parent.version or "none", "parent_stage": parent.stage,
                             "base_model": registry.base_model_tag(cfg.model.base),
                             "data_hash": parent.data_hash, "code_version": ctx.code_version,
                             "config_hash": hash_obj(cfg.compress.model_dump(mode="json")), "cache_key": key,
                             "pipeline_run": ctx.run_id, "weights_hash": dir_hash(folder, "*.safetensors"),
                             "memory_bytes": by[method]["memory_bytes"],
                             "speed_ratio": by[method].get("speed_ratio"), "compress_rank": len(registered) + 1,
                             **machine.tags(result.get("machine"))},
                    run_id=run.info.run_id)
            except Exception as e:  # noqa: BLE001 - a candidate MLflow cannot log as a transformers model
                why = f"{type(e).__name__}: {e}".rstrip(": ")
                log.warning("compress: %s cannot be registered, so it cannot ship (%s)", method, why)
                errors[method] = why
                continue
            registered.append({"method": method, "version": version, "model_dir": str(folder)})
            if len(registered) == 1 and method != result["chosen"]:
                result["reason"] += (f" — {result['chosen']} could not be registered ({errors[result['chosen']]}); "
                                     f"{method} ships")
                result["chosen"], result["chosen_dir"] = method, str(folder)
        version = registered[0]["version"] if registered else None
        result["fallbacks"] = registered[1:]
        if errors:
            result["registration_error"] = "; ".join(f"{m}: {w}" for m, w in errors.items())
        if version is None and result.get("chosen"):
            result["chosen"], result["chosen_dir"] = None, None
        result["model_version"] = version
        result["seconds"] = round(time.time() - t0, 1)
    result_file.write_text(json.dumps(result, indent=1, default=str))
    marker.write_text(key)
    return _compress_summary(result, cached=False, parent=parent)


def _compress_summary(result: dict, cached: bool, parent: Lineage) -> dict[str, Any]:
    keep = ("method", "params", "bytes", "memory_bytes", "tokens_per_s", "tokens_per_s_batched", "speed_ratio",
            "speed_ratio_batched", "metrics", "check", "eligible", "failed", "reloadable", "error", "model_dir")
    shipped = None
    if result.get("chosen") and result.get("model_version"):
        shipped = {"method": result["chosen"], "version": result["model_version"], "model_dir": result["chosen_dir"]}
    return {
        "candidates": [{k: c.get(k) for k in keep if k in c} | ({"chain": c["info"]["chain"]} if "chain" in
                                                                 (c.get("info") or {}) else {})
                       for c in result["candidates"]],
        "parent": {k: result.get("parent_measure", {}).get(k) for k in keep if k in result.get("parent_measure", {})},
        "parent_version": parent.version, "parent_stage": parent.stage,
        "chosen": result.get("chosen"), "reason": result.get("reason"), "runner_up": result.get("runner_up"),
        "front": result.get("front"), "objective": result.get("objective"), "task_metric": result.get("task_metric"),
        "plot": result.get("plot"), "model_version": result.get("model_version"), "shipped": shipped,
        "fallbacks": result.get("fallbacks") or [],
        "registration_error": result.get("registration_error"), "cached": cached, "seconds": result.get("seconds"),
        "machine": result.get("machine"),
    }
