"""compress — make the parent model smaller, measure every candidate, keep the best that is still good.

Recipe, top to bottom:
1. measure and evaluate the parent (the yardstick for every ratio and every delta);
2. for each method in `compress.methods` write a candidate folder under out_root/<method>/:
   nf4 / int8 (bitsandbytes), dynamic_int8 (PyTorch), prune_magnitude / prune_2of4 (masks, optional
   recovery fine-tune, made permanent), prune_structured (a smaller dense Llama + recovery),
   distill (a student cut from the teacher, trained on (1-λ)CE + λT²KL), merge (mergekit, with
   checkpoints that share the parent's base);
3. measure (params, bytes on disk, memory footprint, tokens/s) and evaluate each candidate;
4. select: the smallest candidate within `compress.select` limits of the parent on the task
   metric and within the gate's forgetting guard on every *general* metric (docs/compression.md);
5. report: out_root/compress.json, a markdown table and a Pareto plot (accuracy vs size, marker
   size = latency) at out_root/pareto.png.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from prefect import task

from stagewise.compression import distill as distill_mod
from stagewise.compression import prune, quantize
from stagewise.compression.data import curated_texts, lm_blocks, task_examples
from stagewise.compression.measure import load_candidate, measure, quiet_bnb_warnings, sparsity, tokens_per_s
from stagewise.config import Config, StepConfig, hash_obj
from stagewise.metrics import metric as metric_info
from stagewise.stage import Lineage, RunContext, flat_params, stage_evals, stage_key
from stagewise.workspace import Workspace
from tasks import step

log = logging.getLogger("stagewise")



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


def _call_evaluate(evaluate_fn: Callable, model_dir: Path, model, needs_model: bool) -> dict:
    """Recipe candidates (dynamic int8) exist only in memory: hand the model over when the evaluator takes one."""
    takes_model = "model" in inspect.signature(evaluate_fn).parameters
    if takes_model:
        return evaluate_fn(model_dir, model=model)
    if needs_model:
        return {}  # the folder alone cannot be loaded by a plain HF evaluator: not selectable, said in the report
    return evaluate_fn(model_dir)


# ---------------------------------------------------------------- selection policy
def lower_is_better(metric: str) -> bool:
    return not metric_info(metric).higher_is_better


def _scored(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k.lower()]


def _delta(metric: str, parent: float, cand: float) -> tuple[str, float]:
    """('rise_pct', x) for loss-like metrics; ('drop_points', x) on the 0-100 scale for accuracy-like."""
    info = metric_info(metric)
    if info.relative:
        return "rise_pct", (cand - parent) / abs(parent) * 100 if parent else math.inf
    scale = 100.0 if info.kind == "accuracy" else 1.0
    return "drop_points", (parent - cand) * scale


def check(cfg: Config, parent_metrics: dict, metrics: dict) -> dict:
    """Per-metric deltas vs the parent and whether the candidate passes the task limit and the guard."""
    sel, gate = cfg.compress.select, cfg.gate
    names = _scored(parent_metrics)
    task_metric = sel.task_metric or next((k for k in names if "general" not in k.lower()), None)
    general = [k for k in names if "general" in k.lower()]
    out = {"task_metric": task_metric, "deltas": {}, "failed": []}
    for m in ([task_metric] if task_metric else []) + general:
        if m not in metrics or not isinstance(metrics[m], (int, float)):
            out["failed"].append(f"{m}: not evaluated")
            continue
        kind, d = _delta(m, parent_metrics[m], metrics[m])
        d = round(d, 6)  # (0.17 - 0.15) * 100 is 2.0000000000000018: a 2-point drop must pass a 2-point limit
        out["deltas"][m] = {kind: round(d, 3)}
        if m == task_metric:
            limit = sel.max_task_rise_pct if kind == "rise_pct" else sel.max_task_drop_points
        else:
            limit = gate.perplexity_max_rise_pct if kind == "rise_pct" else gate.general_max_drop_points
        if d > limit:
            out["failed"].append(f"{m}: {kind.replace('_', ' ')} {d:.2f} > {limit}")
    if task_metric is None:
        out["failed"].append("no task metric (set compress.select.task_metric)")
    out["passed"] = not out["failed"]
    return out


def select(cfg: Config, parent: dict, candidates: list[dict]) -> tuple[str | None, str]:
    """The smallest candidate (by compress.select.size_by) no larger than the parent that passes `check`."""
    key = cfg.compress.select.size_by
    ok = [c for c in candidates if c.get("check", {}).get("passed") and c[key] <= parent[key]]
    if not ok:
        why = "; ".join(f"{c['method']}: {', '.join(c.get('check', {}).get('failed', [c.get('error', 'failed')]))}"
                        for c in candidates)
        return None, f"no candidate within limits — keep the parent ({why})"
    tm = ok[0]["check"]["task_metric"]
    sign = 1 if lower_is_better(tm) else -1  # tie on size: better task metric wins
    best = min(ok, key=lambda c: (c[key], sign * c["metrics"][tm]))
    ratio = parent[key] / max(best[key], 1)
    return best["method"], (f"{best['method']}: smallest passing candidate by {key} ({ratio:.2f}x smaller than the "
                            f"parent); {tm} {best['metrics'][tm]} vs parent {parent['metrics'][tm]}")


# ---------------------------------------------------------------- report
def pareto_plot(parent: dict, candidates: list[dict], chosen: str | None, size_by: str, task_metric: str | None,
                path: Path) -> Path | None:
    """Task metric vs size; marker area grows with latency (ms/token); the frontier is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [parent] + [c for c in candidates if task_metric in c.get("metrics", {})]
    if task_metric is None or task_metric not in parent.get("metrics", {}):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r[size_by] / (1e6 if size_by != "params" else 1e3) for r in rows]
    ys = [r["metrics"][task_metric] for r in rows]
    lat = [1000.0 / max(r["tokens_per_s"], 1e-9) for r in rows]
    areas = [40 + 400 * v / max(lat) for v in lat]
    colors = ["black" if r is parent else ("tab:red" if r["method"] == chosen else "tab:blue") for r in rows]
    ax.scatter(xs, ys, s=areas, c=colors, alpha=0.6, edgecolors="k")
    for x, y, r, l in zip(xs, ys, rows, lat):
        ax.annotate(f"{r['method']} ({l:.1f} ms/tok)", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    better = (lambda a, b: a <= b) if lower_is_better(task_metric) else (lambda a, b: a >= b)
    front = sorted((x, y) for i, (x, y) in enumerate(zip(xs, ys))
                   if not any(xs[j] <= x and better(ys[j], y) and (xs[j], ys[j]) != (x, y) for j in range(len(xs))))
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="gray", lw=1, label="Pareto frontier")
        ax.legend(fontsize=8)
    ax.set_xlabel({"memory_bytes": "memory footprint (MB)", "bytes": "weights on disk (MB)", "params": "parameters (k)"}[size_by])
    ax.set_ylabel(task_metric + (" (lower is better)" if lower_is_better(task_metric) else ""))
    ax.set_title("compress: black = parent, red = chosen, marker size = latency", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(parent: dict, candidates: list[dict], chosen: str | None) -> str:
    """Markdown table: sizes and speed as ratios vs the parent, metric deltas, pass/fail."""
    head = "| method | params | MB on disk | MB in memory | tokens/s | size ratio | speedup | metrics | passes |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"

    def row(r, ref):
        if "error" in r:
            return f"| {r['method']} | — | — | — | — | — | — | {r['error']} | no |\n"
        mark = " **(chosen)**" if r["method"] == chosen else ""
        ratio = ref["memory_bytes"] / max(r["memory_bytes"], 1)
        speed = r["tokens_per_s"] / max(ref["tokens_per_s"], 1e-9)
        mets = ", ".join(f"{k}={v:.4g}" for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float)))
        ok = "—" if r is ref else ("yes" if r.get("check", {}).get("passed") else "no: " + "; ".join(r.get("check", {}).get("failed", [])))
        return (f"| {r['method']}{mark} | {r['params']:,} | {r['bytes'] / 1e6:.2f} | {r['memory_bytes'] / 1e6:.2f} | "
                f"{r['tokens_per_s']:.1f} | {ratio:.2f}x | {speed:.2f}x | {mets} | {ok} |\n")

    return head + row(parent, parent) + "".join(row(c, parent) for c in candidates)


# ---------------------------------------------------------------- the step
def compress(cfg: Config, parent_dir: Path, ws: Workspace, out_root: Path,
             evaluate_fn: Callable[[Path], dict] | None = None,
             merge_with: list[Path] | None = None) -> dict:
    """Write, measure and evaluate one candidate per method; pick one. See the module docstring."""
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

    def work(method: str) -> Path:
        return out_root / ".work" / method

    def run(method: str):
        """Returns (model, folder, info, needs_in_memory_eval) for one method."""
        out = out_root / method
        p = c.prune
        if method in ("nf4", "int8"):
            m = quantize.quantize_bnb(parent_dir, out, method, c.quantize.nf4_double_quant, c.quantize.skip_modules)
            return m, out, {"quantization": method}, False
        if method == "dynamic_int8":
            return quantize.quantize_dynamic_int8(parent_dir, out), out, {"quantization": "torch.ao dynamic int8"}, True
        if method in ("prune_magnitude", "prune_2of4", "prune_structured"):
            model = load_model(parent_dir)
            if method == "prune_magnitude":
                model = prune.magnitude_prune(model, p.sparsity)
            elif method == "prune_2of4":
                model = prune.two_four_prune(model)
            else:
                model = prune.structured_prune(model, blocks(p.calibration_texts, p.seq_len), p.mlp_fraction,
                                               p.kv_group_fraction, p.layer_fraction)
            rec = train_data(p.recovery_data, p.recovery_steps * p.batch_size, p.seq_len) if p.recovery_steps > 0 else None
            model, info = distill_mod.recover(model, rec, p.recovery_steps, p.recovery_learning_rate, p.batch_size,
                                        seed, bf16, work(method), teacher=parent_model,
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
            save_model(model, tok, out, info={"method": method, "parent": str(parent_dir), **info})
            return model, out, info, False
        if method == "distill":
            d = c.distill
            student, info = distill_mod.distill(
                parent_model, train_data(d.data, max(d.steps, 1) * d.batch_size, d.seq_len), pad_id=tok.pad_token_id,
                depth_factor=d.depth_factor, width_factor=d.width_factor, mlp_factor=d.mlp_factor, init=d.init,
                steps=d.steps, lr=d.learning_rate, batch_size=d.batch_size, temperature=d.temperature,
                alpha=d.alpha, seed=seed, bf16=bf16, work_dir=work(method),
                calib_blocks=blocks(c.prune.calibration_texts, d.seq_len))
            info["data"] = d.data
            save_model(student, tok, out, info={"method": method, "parent": str(parent_dir), **info})
            return student, out, info, False
        if method == "merge":
            from stagewise.compression.merge import TASK_VECTOR_METHODS, merge_models

            mg = c.merge
            others = [Path(x) for x in merge_with] if merge_with is not None else \
                [ws.model_dir(s) for s in mg.with_stages if ws.model_dir(s).resolve() != parent_dir.resolve()]
            others = [o for o in others if (o / "config.json").exists()]
            if not others:
                raise _Skip(f"nothing to merge with (compress.merge.with_stages={mg.with_stages} not found under "
                            f"{ws.root / 'models'}, and no merge_with passed)")
            base = ws.model_dir(mg.base_stage) if mg.method in TASK_VECTOR_METHODS else None
            if base is not None and not (base / "config.json").exists():
                raise _Skip(f"{base}: merge base missing (compress.merge.base_stage={mg.base_stage!r})")
            models = [parent_dir] + others
            if mg.method == "slerp":
                models = models[:2]
            merge_models(mg.method, models, out, base=base, weights=mg.weights, density=mg.density, t=mg.t, seed=seed)
            return load_model(out).eval(), out, {"merge_method": mg.method, "models": [str(m) for m in models],
                                                  "base": str(base) if base else None}, False
        raise ValueError(f"compress.methods: unknown method {method!r}")

    candidates = []
    for method in c.methods:
        print(f"[compress] {method} ...", flush=True)
        try:
            model, folder, info, in_memory = run(method)
        except _Skip as e:
            candidates.append({"method": method, "model_dir": None, "error": f"skipped: {e}", "parent": str(parent_dir)})
            print(f"[compress] {method} skipped: {e}", flush=True)
            continue
        row = {"method": method, "model_dir": str(folder), **measure(model, folder),
               "metrics": _call_evaluate(evaluate, folder, model, in_memory), "info": info, "parent": str(parent_dir)}
        if in_memory and not row["metrics"]:
            row["info"]["note"] = "evaluate_fn takes only a folder; this recipe candidate needs load_candidate()"
        row["check"] = check(cfg, parent["metrics"], row["metrics"])
        candidates.append(row)
        print(f"[compress] {method}: {row['params']:,} params, {row['memory_bytes'] / 1e6:.2f} MB, "
              f"{row['metrics']}", flush=True)
        del model
        gc.collect()

    # Speed last, all models timed interleaved (fair under a shared CPU's varying load), each reloaded
    # from its folder — which also proves every candidate folder reloads.
    measured = [r for r in candidates if "error" not in r]
    models = {"parent": parent_model} | {r["method"]: load_candidate(Path(r["model_dir"])) for r in measured}
    speed = tokens_per_s(models, c.gen_tokens, c.gen_repeats)
    for r in [parent] + measured:
        r["tokens_per_s"] = speed[r["method"]]
    del models
    gc.collect()
    shutil.rmtree(out_root / ".work", ignore_errors=True)  # Trainer scratch dirs (no checkpoints are kept)
    chosen, reason = select(cfg, parent, measured)
    task_metric = check(cfg, parent["metrics"], parent["metrics"])["task_metric"]
    plot = pareto_plot(parent, measured, chosen, c.select.size_by, task_metric, out_root / "pareto.png")
    md = table(parent, candidates, chosen)
    result = {"candidates": candidates, "chosen": chosen, "reason": reason, "parent_measure": parent,
              "chosen_dir": next((r["model_dir"] for r in measured if r["method"] == chosen), None),
              "plot": str(plot) if plot else None, "table": md}
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
    `compression=<method>` with its parent, when its folder loads as a transformers model.
    """
    import mlflow

    from stagewise import registry
    from stagewise.evaluation import evaluate
    from stagewise.hashing import dir_hash

    parent = lineage[-1]
    out_root = ctx.ws.model_dir("compress")
    key = stage_key(step("compress"), cfg, parent, parent.data_hash)
    marker, result_file = out_root / "cache_key", out_root / "compress.json"
    if not ctx.forced("compress") and marker.exists() and marker.read_text() == key and result_file.exists():
        result = json.loads(result_file.read_text())
        return _compress_summary(result, cached=True)

    eval_tasks = stage_evals(parent.stage)

    def evaluate_fn(model_dir: Path, model=None) -> dict:
        res = evaluate(Path(model_dir), eval_tasks, ctx.ws, cfg.evaluate, model=model)
        return {f"{t}/{m}": v for t, d in res.items() for m, v in d.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and m != "n" and not m.endswith("_stderr")}

    t0 = time.time()
    with mlflow.start_run(run_name="compress", nested=ctx.mlflow_run_id is not None,
                          parent_run_id=ctx.mlflow_run_id) as run:
        mlflow.set_tags({"stage": "compress", "pipeline_run": ctx.run_id, "parent_version": parent.version or ""})
        mlflow.log_params(flat_params("compress", cfg.compress.model_dump(mode="json")))
        result = compress(StepConfig(cfg, "compress", step("compress").reads), Path(parent.model_dir), ctx.ws,
                          out_root, evaluate_fn)
        for c in result["candidates"]:
            for k in ("params", "bytes", "memory_bytes", "tokens_per_s"):
                if isinstance(c.get(k), (int, float)):
                    mlflow.log_metric(f"{c['method']}.{k}", float(c[k]))
        mlflow.log_text(result.get("table") or "", "compress.md")
        if result.get("plot"):
            mlflow.log_artifact(result["plot"])
        version = None
        if result.get("chosen_dir"):
            try:
                version = registry.log_model_version(
                    Path(result["chosen_dir"]), ctx.registered_model, "compress",
                    lineage={"parent_version": parent.version or "none", "compression": result["chosen"],
                             "data_hash": parent.data_hash, "code_version": ctx.code_version,
                             "config_hash": hash_obj(cfg.compress.model_dump(mode="json")), "cache_key": key,
                             "pipeline_run": ctx.run_id,
                             "weights_hash": dir_hash(Path(result["chosen_dir"]), "*.safetensors")},
                    run_id=run.info.run_id)
            except Exception as e:  # noqa: BLE001 - a candidate MLflow cannot log as a transformers model
                # (bitsandbytes 4-bit folders can, via registry.resaveable): keep the folder as run
                # artifacts, with the reason, instead of a model version.
                why = f"{type(e).__name__}: {e}".rstrip(": ")
                log.warning("compress: chosen %s kept as artifacts, not registered (%s)", result["chosen"], why)
                mlflow.log_artifacts(result["chosen_dir"], artifact_path=f"chosen/{result['chosen']}")
                result["registration_error"] = why
        result["model_version"] = version
        result["seconds"] = round(time.time() - t0, 1)
    result_file.write_text(json.dumps(result, indent=1, default=str))
    marker.write_text(key)
    return _compress_summary(result, cached=False)


def _compress_summary(result: dict, cached: bool) -> dict[str, Any]:
    keep = ("method", "params", "bytes", "memory_bytes", "tokens_per_s", "metrics", "check", "error", "model_dir")
    return {
        "candidates": [{k: c.get(k) for k in keep if k in c} for c in result["candidates"]],
        "parent": {k: result.get("parent_measure", {}).get(k) for k in keep if k in result.get("parent_measure", {})},
        "chosen": result.get("chosen"), "reason": result.get("reason"), "plot": result.get("plot"),
        "model_version": result.get("model_version"), "registration_error": result.get("registration_error"),
        "cached": cached, "seconds": result.get("seconds"),
    }
