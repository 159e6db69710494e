"""Knowledge distillation: teacher → smaller student, Hinton et al. (2015) on the pipeline's data.

    loss = (1 - λ) · CE(y, p_s) + λ · T² · KL(p_t^T ‖ p_s^T),     p^T = softmax(logits / T)

T² keeps the soft term's gradient scale independent of T. Why not TRL: TRL 1.16's
`DistillationTrainer` (and `trl.experimental.gkd`) is on-policy GKD — the student generates its own
completions every step and matches the teacher under a generalized JSD. That is a different
objective (no hard-label CE, no T² soft-target term) and generation-heavy on a CPU. This recipe is
the offline one on fixed data, so it is a compact loss plus an HF `Trainer` subclass.

Student initialisation (`init: prune`, Minitron-style): the student is cut from the teacher with
`prune.shrink_llama` — most influential layers (ShortGPT block influence), strongest residual
channels and MLP neurons on calibration text — so distillation starts from useful weights.
`init: scratch` builds the same config with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from stagewise.compression import prune


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last dimension."""
    return F.softmax(logits.float() / temperature, dim=-1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 2.0, alpha: float = 0.5, shift: bool = True) -> dict[str, torch.Tensor]:
    """(1-λ)·CE + λ·T²·KL(p_t^T ‖ p_s^T), averaged over labelled positions (labels == -100 are ignored).

    shift=True: logits at position t predict labels at t+1 (causal LM, labels = input ids).
    """
    if shift:
        student_logits, teacher_logits, labels = student_logits[..., :-1, :], teacher_logits[..., :-1, :], labels[..., 1:]
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    y = labels.reshape(-1)
    keep = y != -100
    s, t, y = s[keep], t[keep], y[keep]
    ce = F.cross_entropy(s, y)
    # KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s); kl_div takes log p_s as input and p_t (as log) as target
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  reduction="batchmean", log_target=True)
    loss = (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return {"loss": loss, "ce": ce.detach(), "kl": kl.detach()}


def make_student(teacher, blocks: torch.Tensor, depth_factor: float, width_factor: float, mlp_factor: float,
                 init: str = "prune", seed: int = 0):
    """A smaller Llama: fewer layers, narrower residual stream and MLP; key/value groups kept."""
    cfg = teacher.config
    n_layers = max(1, round(cfg.num_hidden_layers * depth_factor))
    hidden = max(8, int(round(cfg.hidden_size * width_factor / 8)) * 8)
    inter = max(8, int(round(cfg.intermediate_size * mlp_factor / 8)) * 8)
    if init == "prune":
        stats = prune.calibrate(teacher, blocks)
        layers = prune.top_k(stats["influence"], n_layers).tolist()
        return prune.shrink_llama(
            teacher, layers=layers, hidden=prune.top_k(stats["channels"], hidden),
            neurons=[prune.top_k(stats["mlp"][i], inter) for i in layers])
    if init != "scratch":
        raise ValueError(f"compress.distill.init={init!r}: use prune or scratch")
    from transformers import LlamaForCausalLM

    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    small_cfg = cfg.__class__.from_dict({**cfg.to_dict(), "num_hidden_layers": n_layers, "hidden_size": hidden,
                                         "intermediate_size": inter, "head_dim": hd})
    torch.manual_seed(seed)
    student = LlamaForCausalLM(small_cfg)
    student.generation_config = teacher.generation_config
    return student


def distillation_trainer_class():
    """HF Trainer whose loss is `distill_loss` against a frozen teacher (built lazily: transformers is heavy)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def __init__(self, *args, teacher=None, temperature: float = 2.0, alpha: float = 0.5, **kw):
            super().__init__(*args, **kw)
            self.teacher = teacher.eval().requires_grad_(False)
            self.temperature, self.alpha = temperature, alpha

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            out = model(**fwd)
            with torch.no_grad():
                t_logits = self.teacher(**fwd).logits
            parts = distill_loss(out.logits, t_logits, labels, self.temperature, self.alpha)
            return (parts["loss"], out) if return_outputs else parts["loss"]

    return DistillTrainer


def fine_tune(model, data, *, steps: int, lr: float, batch_size: int, seed: int, bf16: bool, work_dir: Path,
              teacher=None, temperature: float = 2.0, alpha: float = 0.0, pad_id: int = 0) -> dict:
    """Train `model` in place for `steps` steps; returns first/final loss and runtime.

    data: a [n, seq_len] tensor of packed blocks (loss on every token) or a list of
    {input_ids, labels} examples of any length (labels -100 are not learned; batches are padded).
    With a teacher and alpha > 0 the loss is `distill_loss` against it, else the model's own CE.
    """
    from transformers import Trainer

    from stagewise.compression.data import BlockDataset, ExampleDataset, pad_collator, training_args
    from stagewise.modeling import quiet

    if isinstance(data, torch.Tensor):
        dataset, collator = BlockDataset(data), None
    else:
        dataset, collator = ExampleDataset(list(data)), pad_collator(pad_id)
    args = training_args(work_dir, steps, lr, batch_size, seed, bf16)
    kw = dict(model=model, args=args, train_dataset=dataset, data_collator=collator)
    if teacher is not None and alpha > 0:
        trainer = distillation_trainer_class()(**kw, teacher=teacher, temperature=temperature, alpha=alpha)
    else:
        trainer = Trainer(**kw)
    model.train()
    out = quiet(trainer).train()
    model.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "runtime_s": round(out.metrics.get("train_runtime", 0.0), 1)}


def distill(teacher, data, *, depth_factor: float, width_factor: float, mlp_factor: float,
            init: str, steps: int, lr: float, batch_size: int, temperature: float, alpha: float,
            seed: int, bf16: bool, work_dir: Path, calib_blocks: torch.Tensor | None = None, pad_id: int = 0):
    """Build the student and train it against the teacher. Returns (student, info).

    data: packed blocks or {input_ids, labels} examples (see `fine_tune`); calib_blocks rank the
    teacher's units for `init: prune` (default: the first 32 blocks of `data`)."""
    if calib_blocks is None:
        if not isinstance(data, torch.Tensor):
            raise ValueError("distill: pass calib_blocks (packed text blocks) when data is a list of examples")
        calib_blocks = data[:32]
    student = make_student(teacher, calib_blocks, depth_factor, width_factor, mlp_factor, init, seed)
    info = {"student_layers": student.config.num_hidden_layers, "student_hidden": student.config.hidden_size,
            "student_intermediate": student.config.intermediate_size, "temperature": temperature, "alpha": alpha,
            "init": init, "steps": steps}
    if steps > 0:
        info |= fine_tune(student, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed, bf16=bf16,
                          work_dir=work_dir, teacher=teacher, temperature=temperature, alpha=alpha, pad_id=pad_id)
    return student.eval(), info


# ---------------------------------------------------------------- recovery after pruning
def recover(model, data, steps: int, lr: float, batch_size: int, seed: int, bf16: bool, work_dir: Path,
            teacher=None, temperature: float = 2.0, alpha: float = 0.0, pad_id: int = 0):
    """A short fine-tune after pruning; masks, if attached, keep pruned weights at zero.

    data: packed blocks or {input_ids, labels} examples (`fine_tune`). With the unpruned
    parent as `teacher` and alpha > 0 the loss is the distillation loss against it: the pruned model
    is pulled back towards the parent's full output distribution, not only the data's next token.
    """
    if steps <= 0:
        return model, {}
    res = fine_tune(model, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed, bf16=bf16, work_dir=work_dir,
                    teacher=teacher, temperature=temperature, alpha=alpha, pad_id=pad_id)
    return model, {"recovery_steps": steps, "recovery_first_loss": res["first_loss"],
                   "recovery_final_loss": res["final_loss"], "recovery_runtime_s": res["runtime_s"],
                   **({"recovery_alpha": alpha, "recovery_temperature": temperature} if teacher is not None and alpha > 0 else {})}
