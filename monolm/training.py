"""The one training loop both arms use (stages 2 and 3), so the only difference between them is the
model handed in.

Why it looks like this:
- Precision: parameters and AdamW state are fp32, always; bf16 is only autocast compute. The
  original study trained pure-bf16 weights, and AdamW updates of ~5e-5 were below bf16's spacing
  for V in [-9, -2], so the constrained weights never moved. A model handed in as bf16 is upcast.
- Gradient accumulation is token-weighted: every micro-batch's summed loss is divided by the
  number of predicted tokens in the *whole* optimizer batch, so k micro-batches of b sequences
  give the same update as one batch of k*b (up to float summation order).
- Data order is a permutation per epoch drawn from an explicit generator seeded with
  `derive_seed(seed, "data", epoch)`; the position is (epoch, index into the permutation). With
  model, optimizer, scheduler, RNG states and position checkpointed, a resumed run is bitwise
  identical to an uninterrupted one on CPU.
- The constrained arm computes each softplus(V) once per forward+backward
  (`parametrize.cached()`; it matters with gradient checkpointing, which re-runs the forward), and
  after every optimizer step checks the *materialized* constrained weights: negative or
  non-finite values abort the run, and the interval minimum is logged as evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_model as _save_safetensors_model
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from monolm.artifacts import CorruptArtifact, atomic_dir, atomic_write_json, read_json, recover_replaced, sha256_file
from monolm.checkpoint import (
    check_fingerprint,
    digest_json,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    make_fingerprint,
    move_aside,
    save_checkpoint,
    verify_checkpoint,
)
from monolm.config import ArmConfig
from monolm.constraints import ConstraintViolation, constrained_modules, min_constrained_weight
from monolm.runtime import autocast, derive_seed, pick_device, resolve_flag, seed_everything

log = logging.getLogger("monolm.training")

HISTORY_FILE = "history.json"
BEST_DIR = "best"
BEST_MARKER = "best.json"
CHECKPOINTS_DIR = "checkpoints"
ADAM_EPS = 1e-8
# Arm fields that only decide *when* checkpoints are written; changing them must not block a resume.
_CADENCE_FIELDS = {"checkpoint_every_steps", "checkpoint_every_minutes", "keep_last_checkpoints"}
WALL_CLOCK_FIELDS = ("tokens_per_s", "wall_time_s")

Evaluate = Callable[[nn.Module], dict]
SaveModel = Callable[[nn.Module, Path], list[str]]


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became non-finite."""


@dataclass
class TrainResult:
    history_path: Path
    best_dir: Path
    final_metrics: dict[str, Any]
    steps: int  # optimizer steps completed so far (== total_steps when completed)
    total_steps: int
    tokens_seen: int
    effective_batch_size: int
    resumed_from: Path | None  # the checkpoint this call resumed from
    completed: bool  # False when stopped early by `max_steps_this_call`
    history: dict[str, Any] = field(repr=False, default_factory=dict)


# --------------------------------------------------------------------------- schedule and budget
def total_steps_for(arm: ArmConfig, n_sequences: int) -> int:
    """min(max_steps, ceil(epochs * N / effective_batch)): the optimizer-step budget."""
    steps = math.ceil(arm.epochs * n_sequences / arm.effective_batch_size)
    if arm.max_steps is not None:
        steps = min(steps, arm.max_steps)
    return max(1, steps)


class LRSchedule:
    """Multiplier of the base lr for 0-based step `s`: linear warmup to 1, then cosine/linear decay
    to `min_lr_ratio` or constant. A plain object (not a closure) so `LambdaLR.state_dict()`
    records its fields in the checkpoint."""

    def __init__(self, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(warmup_steps, total_steps))
        self.kind = kind
        self.min_lr_ratio = float(min_lr_ratio)

    @classmethod
    def from_arm(cls, arm: ArmConfig, total_steps: int) -> "LRSchedule":
        return cls(total_steps, math.ceil(arm.warmup_ratio * total_steps), arm.schedule, arm.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # never 0: the first step is not wasted
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


# --------------------------------------------------------------------------- data order
class DataOrder:
    """Yields sequence indices: one permutation per epoch from an explicit, seeded generator.

    A batch that runs past the end of an epoch continues with the next epoch's permutation, so
    every optimizer step has exactly `effective_batch` sequences.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        if n < 1:
            raise ValueError("no training sequences")
        self.n, self.seed = n, seed
        self.epoch, self.index = epoch, index
        self._make_perm()

    def _make_perm(self) -> None:
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(self.seed, "data", self.epoch))
        self.perm = torch.randperm(self.n, generator=g)
        self.generator_state = g.get_state()

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._make_perm()
            chunk = self.perm[self.index : self.index + k]
            parts.append(chunk)
            self.index += len(chunk)
            k -= len(chunk)
        return torch.cat(parts)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @property
    def epochs_done(self) -> float:
        return (self.epoch * self.n + self.index) / self.n


# --------------------------------------------------------------------------- model helpers
def _param_groups(model: nn.Module, weight_decay: float) -> tuple[list[str], list[dict[str, Any]]]:
    """Decay matrices (incl. parametrization originals V and embeddings), not biases/norms —
    the usual rule, identical for both arms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return names, [g for g in groups if g["params"]]


def _ensure_fp32(model: nn.Module) -> None:
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        log.warning("model parameters are %s; upcasting to fp32 (pure-bf16 AdamW drops updates "
                    "smaller than bf16's spacing; bf16 is used only as autocast compute)", low)
        model.float()


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # works with parametrize.cached() and inputs without grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


def _lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def accumulate_gradients(
    model: nn.Module,
    batch: torch.LongTensor,
    micro_batch_size: int,
    *,
    autocast_enabled: bool = False,
    cache_parametrizations: bool = False,
) -> torch.Tensor:
    """Forward+backward `batch` [B, T] in micro-batches, adding into `.grad`; returns the summed
    next-token loss (a detached scalar). Each micro-batch's summed loss is divided by the number
    of predicted tokens in the whole batch, so the accumulated gradient is that of the batch mean.
    Every position predicts the next token (packed blocks have no padding)."""
    device = next(model.parameters()).device
    n_targets = batch.shape[0] * (batch.shape[1] - 1)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, batch.shape[0], micro_batch_size):
        ids = batch[start : start + micro_batch_size].to(device, non_blocking=True)
        cache = parametrize.cached() if cache_parametrizations else contextlib.nullcontext()
        with cache:
            if cache_parametrizations:
                # Materialize every W = softplus(V) once, *before* the forward: with activation
                # checkpointing the first access would otherwise fall inside a checkpointed block
                # and its recomputation (served from the cache) would save different tensors.
                for _, module in constrained_modules(model):
                    module.weight  # noqa: B018 - fills parametrize's cache
            with autocast(device, autocast_enabled):
                logits = _lm_logits(model, ids)
            loss_sum = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            (loss_sum / n_targets).backward()
        total += loss_sum.detach()
    return total


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: torch.LongTensor,
    arm: ArmConfig,
    *,
    constrained: bool,
    use_amp: bool,
) -> tuple[float, float, float | None]:
    """One optimizer step on `batch` (all micro-batches): accumulate, clip, AdamW, schedule, and for
    the constrained arm the check of the materialized weights. Returns (summed loss over predicted
    tokens, pre-clip gradient norm, min constrained weight or None). The loop and `bench/` share it.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = accumulate_gradients(model, batch, arm.micro_batch_size, autocast_enabled=use_amp,
                                    cache_parametrizations=constrained)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if arm.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, arm.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    loss_value, norm_value = float(loss_sum), float(grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise TrainingDiverged(f"loss sum {loss_value}, grad norm {norm_value} (not finite)")
    optimizer.step()
    scheduler.step()
    min_w = min_constrained_weight(model) if constrained else None  # after *every* step
    return loss_value, norm_value, min_w


def build_optimizer(model: nn.Module, arm: ArmConfig, total_steps: int):
    """AdamW (fp32 state) over decay/no-decay groups plus the LambdaLR schedule; returns
    (param_names in optimizer order, optimizer, scheduler)."""
    param_names, groups = _param_groups(model, arm.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=arm.lr, betas=(arm.adam_beta1, arm.adam_beta2), eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.from_arm(arm, total_steps))
    return param_names, optimizer, scheduler


def _default_save_model(model: nn.Module, directory: Path) -> list[str]:
    _save_safetensors_model(model, str(directory / "model.safetensors"))
    return ["model.safetensors"]


def _data_digest(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- best model
def _save_best(out_dir: Path, model: nn.Module, save_model: SaveModel, *, step: int,
               metrics: dict[str, Any], fingerprint_digest: str) -> None:
    """Replace `best/` atomically; `best.json` (written last) records step, metrics, digests."""
    with atomic_dir(out_dir / BEST_DIR, existing="replace") as tmp:
        files = save_model(model, tmp)
        digests = {rel: sha256_file(tmp / rel) for rel in files}
        atomic_write_json(tmp / BEST_MARKER, {"step": step, "metrics": metrics, "files": digests,
                                              "fingerprint": fingerprint_digest})


def _read_best(out_dir: Path, fingerprint_digest: str) -> dict[str, Any] | None:
    """The best model's marker if `best/` is intact and belongs to this run, else None."""
    best = out_dir / BEST_DIR
    recover_replaced(best)
    marker = best / BEST_MARKER
    if not marker.is_file():
        return None
    try:
        info = read_json(marker)
        if info.get("fingerprint") != fingerprint_digest:
            log.warning("ignoring %s: written by a different model/recipe/run", best)
            return None
        for rel, digest in info["files"].items():
            if not (best / rel).is_file() or sha256_file(best / rel) != digest:
                raise CorruptArtifact(best / rel, "missing or sha256 differs from best.json")
    except (CorruptArtifact, KeyError, TypeError) as exc:
        log.warning("ignoring best model in %s: %s", best, exc)
        return None
    return info


def _replay_point_for_lost_best(out_dir: Path, ckpt_root: Path, latest: Path,
                                fingerprint: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from when the best model this run already selected is missing or
    damaged: the newest valid one *before* the recorded best step (None: from the start).

    A damaged best model must never be re-blessed by a finished run. Resuming is exact, so
    replaying from before the best step re-selects and rewrites the very same best model (its
    evaluation is the minimum over all evaluations, hence over the replayed ones). Checkpoints
    after the replay point are moved aside; they are re-written identically by the replay.
    """
    # Another model's/recipe's checkpoints are refused (CheckpointMismatch), never replayed over.
    check_fingerprint(verify_checkpoint(latest)["fingerprint"], fingerprint, latest)
    recorded = json.loads((latest / "state.json").read_text())["train"]["history"]["summary"].get("best_step")
    if recorded is None:
        return latest  # no best model was selected yet: nothing to recreate
    point = None
    for step_no, path in reversed(list_checkpoints(ckpt_root)):
        if step_no >= recorded:
            continue
        try:
            verify_checkpoint(path)
        except (CorruptArtifact, OSError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        point = path
        break
    log.warning("%s: the best model (step %d) is missing or damaged; replaying from %s to recreate it exactly",
                out_dir, recorded, point if point is not None else "the start")
    if (out_dir / BEST_DIR).exists():
        move_aside(out_dir / BEST_DIR, "missing or damaged files; recreated by replaying training")
    for step_no, path in list_checkpoints(ckpt_root):
        if point is None or step_no > int(point.name.split("-")[1]):
            move_aside(path, f"superseded: replaying from {point.name if point else 'the start'} to recreate the best model")
    return point


# --------------------------------------------------------------------------- the loop
def _new_interval() -> dict[str, Any]:
    return {"loss_sum": 0.0, "targets": 0, "tokens": 0, "steps": 0, "grad_norm_sum": 0.0,
            "seconds": 0.0, "min_w": None}


def _final_metrics(history: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if history["log"]:
        out["train_loss"] = history["log"][-1]["train_loss"]
    if history["eval"]:
        out.update({k: v for k, v in history["eval"][-1].items() if k != "step"})
    s = history["summary"]
    out.update(best_step=s["best_step"], best_val_perplexity=s["best_val_perplexity"])
    if "min_constrained_weight" in s:
        out["min_constrained_weight"] = s["min_constrained_weight"]
    return out


def train(
    model: nn.Module,
    train_blocks: torch.LongTensor,
    arm: ArmConfig,
    out_dir: Path,
    *,
    seed: int,
    evaluate: Evaluate | None,
    constrained: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
    save_model: SaveModel | None = None,
    max_steps_this_call: int | None = None,
) -> TrainResult:
    """Train `model` on `train_blocks` [N, T] with the recipe `arm`, resuming from the newest valid
    checkpoint in `out_dir/checkpoints` if there is one.

    `evaluate(model)` (run under `torch.no_grad()`, model in eval mode) returns at least
    `{"perplexity": ..., "loss": ...}` on held-out data; `best/` holds the model with the lowest
    validation perplexity (the final model when `evaluate` is None), written by `save_model(model,
    dir) -> [files]` (default: the state_dict as `model.safetensors`). `max_steps_this_call` stops
    after that many steps with a checkpoint (a worker draining before its walltime, and the
    resume tests). Writes `out_dir/history.json` atomically at every log/eval.

    A fresh start seeds the global Python/NumPy/torch RNGs (dropout) from `derive_seed(seed,
    "train")`; a resume restores them, the optimizer, scheduler and data position from the
    checkpoint, so the continuation is the same computation as an uninterrupted run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else pick_device()
    save_model = save_model or _default_save_model
    if train_blocks.dtype != torch.long or train_blocks.ndim != 2 or train_blocks.shape[1] < 2:
        raise ValueError(f"train_blocks must be a LongTensor [N, T>=2], got {train_blocks.dtype} "
                         f"{list(train_blocks.shape)}")
    n_seq, seq_len = train_blocks.shape
    train_blocks = train_blocks.cpu()
    has_constraint = bool(constrained_modules(model))
    if constrained != has_constraint:
        raise ValueError(
            f"constrained={constrained} but the model "
            f"{'has' if has_constraint else 'has no'} parametrized weights; wrong model for this arm?"
        )

    _ensure_fp32(model)
    model.to(device)
    use_amp = resolve_flag(arm.bf16, device)
    if resolve_flag(arm.gradient_checkpointing, device):
        _enable_gradient_checkpointing(model)

    eff = arm.effective_batch_size
    total_steps = total_steps_for(arm, n_seq)
    param_names, optimizer, scheduler = build_optimizer(model, arm, total_steps)
    fingerprint = make_fingerprint(
        model,
        config={k: v for k, v in arm.model_dump(mode="json").items() if k not in _CADENCE_FIELDS},
        run={"seed": seed, "constrained": constrained, "data_shape": [n_seq, seq_len],
             "data_sha256": _data_digest(train_blocks), "total_steps": total_steps},
    )
    fp_digest = digest_json(fingerprint)
    ckpt_root = out_dir / CHECKPOINTS_DIR

    # ------------------------------------------------------------------ fresh start or resume
    latest = latest_valid_checkpoint(ckpt_root)
    best = _read_best(out_dir, fp_digest)
    if latest is not None and best is None and evaluate is not None:
        latest = _replay_point_for_lost_best(out_dir, ckpt_root, latest, fingerprint)
    if latest is not None:
        loaded = load_checkpoint(latest, model=model, optimizer=optimizer, param_names=param_names,
                                 scheduler=scheduler, fingerprint=fingerprint)
        st = loaded.state
        for step_no, path in list_checkpoints(ckpt_root):  # newer ones were skipped as invalid
            if step_no > loaded.step:
                move_aside(path, f"not valid; resumed from {latest.name} instead")
        order = DataOrder(n_seq, seed, **st["data_position"])
        if loaded.data_generator_state is None or not torch.equal(order.generator_state, loaded.data_generator_state):
            raise RuntimeError(f"{latest}: the data order would differ from the checkpointed run "
                               "(data permutation generator state mismatch)")
        step, tokens_seen, history = st["step"], st["tokens_seen"], st["history"]
        interval, wall_before = st["interval"], st["wall_time_s"]
        history.setdefault("resumes", []).append({"step": step, "checkpoint": str(latest)})
        log.info("resuming %s from %s (step %d/%d)", out_dir, latest, step, total_steps)
    else:
        seed_everything(derive_seed(seed, "train"))
        order = DataOrder(n_seq, seed)
        step, tokens_seen, interval, wall_before = 0, 0, _new_interval(), 0.0
        history = {
            "log": [],
            "eval": [],
            "summary": {
                "effective_batch_size": eff, "micro_batch_size": arm.micro_batch_size,
                "grad_accum_steps": arm.grad_accum_steps, "seq_len": seq_len, "n_sequences": n_seq,
                "total_steps": total_steps, "tokens_seen": 0, "steps_done": 0, "constrained": constrained,
                "seed": seed, "bf16_autocast": use_amp, "best_step": None, "best_val_perplexity": None,
            },
            "resumes": [],
        }
        if constrained:
            history["summary"]["min_constrained_weight"] = min_constrained_weight(model)

    summary = history["summary"]
    if best is not None:
        summary["best_step"] = best["step"]
        summary["best_val_perplexity"] = best["metrics"].get("val_perplexity")
    elif summary["best_step"] is not None:
        log.warning("history records best step %s but %s is missing or invalid; best model selection "
                    "restarts from the next evaluation", summary["best_step"], out_dir / BEST_DIR)
        summary["best_step"] = summary["best_val_perplexity"] = None

    history_path = out_dir / HISTORY_FILE
    if latest is not None:  # drop entries a lost attempt wrote after the resumed checkpoint
        atomic_write_json(history_path, history)
    stop_at = total_steps if max_steps_this_call is None else min(total_steps, step + max_steps_this_call)
    call_start = time.perf_counter()
    last_ckpt = time.monotonic()

    def wall() -> float:
        return wall_before + (time.perf_counter() - call_start)

    def train_state() -> dict[str, Any]:
        return {"step": step, "tokens_seen": tokens_seen, "data_position": order.position,
                "interval": interval, "wall_time_s": wall(), "history": history}

    def emit(kind: str, entry: dict[str, Any]) -> None:
        if on_log is not None:
            on_log({"kind": kind, **entry})

    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=None if progress else True,
               desc="train (constrained)" if constrained else "train", unit="step", dynamic_ncols=True)
    try:
        while step < stop_at:
            t0 = time.perf_counter()
            batch = train_blocks[order.take(eff)]
            lr = scheduler.get_last_lr()[0]
            try:
                loss_value, norm_value, mw = training_step(model, optimizer, scheduler, batch, arm,
                                                           constrained=constrained, use_amp=use_amp)
            except (ConstraintViolation, TrainingDiverged) as exc:
                raise type(exc)(f"optimizer step {step + 1}: {exc}") from None
            step += 1
            tokens_seen += eff * seq_len
            if constrained:
                interval["min_w"] = mw if interval["min_w"] is None else min(interval["min_w"], mw)
                summary["min_constrained_weight"] = min(summary["min_constrained_weight"], mw)
            interval["loss_sum"] += loss_value
            interval["targets"] += eff * (seq_len - 1)
            interval["tokens"] += eff * seq_len
            interval["steps"] += 1
            interval["grad_norm_sum"] += norm_value
            interval["seconds"] += time.perf_counter() - t0
            summary.update(tokens_seen=tokens_seen, steps_done=step)
            touched = False

            if step % arm.log_every_steps == 0 or step == total_steps:
                entry = {
                    "step": step,
                    "epoch": order.epochs_done,
                    "lr": lr,
                    "train_loss": interval["loss_sum"] / interval["targets"],
                    "tokens_seen": tokens_seen,
                    "tokens_per_s": interval["tokens"] / max(interval["seconds"], 1e-9),
                    "wall_time_s": wall(),
                    "grad_norm": interval["grad_norm_sum"] / interval["steps"],
                }
                if constrained:
                    entry["min_constrained_weight"] = interval["min_w"]
                history["log"].append(entry)
                emit("train", entry)
                bar.set_postfix(loss=f"{entry['train_loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                interval = _new_interval()
                touched = True

            if evaluate is not None and (step % arm.eval_every_steps == 0 or step == total_steps):
                metrics = _run_eval(model, evaluate, constrained)
                entry = {"step": step, **metrics}
                history["eval"].append(entry)
                emit("eval", entry)
                ppl = metrics["val_perplexity"]
                if summary["best_val_perplexity"] is None or ppl < summary["best_val_perplexity"]:
                    _save_best(out_dir, model, save_model, step=step, metrics=metrics, fingerprint_digest=fp_digest)
                    summary.update(best_step=step, best_val_perplexity=ppl)
                touched = True

            if evaluate is None and step == total_steps:
                _save_best(out_dir, model, save_model, step=step, metrics={}, fingerprint_digest=fp_digest)
                summary.update(best_step=step, best_val_perplexity=None)
                touched = True

            if touched:
                atomic_write_json(history_path, history)
            due_minutes = (time.monotonic() - last_ckpt) / 60.0 >= arm.checkpoint_every_minutes
            if step % arm.checkpoint_every_steps == 0 or due_minutes or step == stop_at:
                save_checkpoint(ckpt_root, step, model=model, optimizer=optimizer, param_names=param_names,
                                scheduler=scheduler, state=train_state(), fingerprint=fingerprint,
                                data_generator_state=order.generator_state, keep_last=arm.keep_last_checkpoints)
                last_ckpt = time.monotonic()
            bar.update(1)
    finally:
        bar.close()

    completed = step >= total_steps
    if completed and _read_best(out_dir, fp_digest) is None:
        if evaluate is None:  # a finished run whose best/ was deleted or damaged: the final model is the best
            _save_best(out_dir, model, save_model, step=step, metrics={}, fingerprint_digest=fp_digest)
            summary.update(best_step=step, best_val_perplexity=None)
        else:
            log.warning("%s: training finished but no valid best model exists", out_dir)
    atomic_write_json(history_path, history)
    return TrainResult(
        history_path=history_path,
        best_dir=out_dir / BEST_DIR,
        final_metrics=_final_metrics(history),
        steps=step,
        total_steps=total_steps,
        tokens_seen=tokens_seen,
        effective_batch_size=eff,
        resumed_from=latest,
        completed=completed,
        history=history,
    )


def _run_eval(model: nn.Module, evaluate: Evaluate, constrained: bool) -> dict[str, Any]:
    """Call `evaluate` in eval mode without autograd (softplus cached once for the whole pass)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (parametrize.cached() if constrained else contextlib.nullcontext()):
            raw = evaluate(model)
    finally:
        model.train(was_training)
    if "perplexity" not in raw:
        raise KeyError(f"evaluate() must return 'perplexity' (best-model selection uses it); got {sorted(raw)}")
    metrics = {f"val_{k}": (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
               for k, v in raw.items()}
    if not math.isfinite(metrics["val_perplexity"]):
        log.warning("validation perplexity is %s", metrics["val_perplexity"])
    return metrics


def load_history(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
