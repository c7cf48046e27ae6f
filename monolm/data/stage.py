"""Stage 0 — setup: fetch (or, for `tiny`, build and pre-train) the base model, cut the data
into train, validation, test and attack parts, and verify that everything later stages need is
there and consistent. verification.json records what each check measured and the verdict
computed from it, and what the contamination check measured on every held-out part.

For the tiny preset the "pretrained" model is a real language model: a byte-level BPE tokenizer
and a GPT-NeoX are trained on the train split of the embedded corpus (as Pythia was trained on the
Pile's train split), so constraining, attacking and evaluating it means something.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from monolm.config import ArmConfig, ConfigError, ExperimentConfig
from monolm.core.artifacts import atomic_write_json, nearest_existing, sha256_file
from monolm.core.runtime import derive_seed
from monolm.data import splits as data_lib
from monolm.models import loading as models
from monolm.study.frame import Inputs, OnLog, StageFailed, StageRef, existing, files_under, finish, prepare
from monolm.study.layout import CellPaths
from monolm.study.registry import attack_text_budget

log = logging.getLogger("monolm.stages.setup")
STAGE = "setup"


def model_dir(ref: StageRef) -> Path:
    """Where the base model of a finished setup stage lives (in the stage folder for tiny/local
    copies, in the HF cache for hub models)."""
    return Path(ref.metrics["model_dir"])


def _pretrain_tiny(
    cfg: ExperimentConfig, seed: int, splits: data_lib.Splits, out: Path, progress: bool, on_log: OnLog | None
):
    from monolm.training import train

    tiny = cfg.model.tiny
    tokenizer = data_lib.train_bpe_tokenizer(splits.train, tiny.vocab_size)
    model = models.build_offline_model(cfg.model, tokenizer, seed=derive_seed(seed, "init"))
    blocks = data_lib.pack_blocks(data_lib.tokenize(tokenizer, splits.train), cfg.data.seq_len, tokenizer.eos_token_id)
    arm = ArmConfig(
        lr=tiny.pretrain_lr,
        max_steps=max(tiny.pretrain_steps, 1),
        epochs=1000.0,
        warmup_ratio=0.05,
        schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.01,
        micro_batch_size=tiny.pretrain_batch_size,
        grad_accum_steps=1,
        log_every_steps=25,
        eval_every_steps=10**9,
        checkpoint_every_steps=100,
        keep_last_checkpoints=1,
    )
    result = None
    if tiny.pretrain_steps > 0 and cfg.model.source == "tiny":  # an architecture keeps its random weights
        # Pre-training stops at each snapshot step (with a checkpoint) and resumes from it, which
        # is the same computation as one uninterrupted run: the snapshots are the quality
        # ladder's rungs at no extra training (monolm.controls.ladder). The first call takes no
        # step: it finds where a re-run resumes (a killed stage keeps its checkpoints).
        def pretrain(steps: int):
            return train(
                model,
                blocks,
                arm,
                out / "pretrain",
                seed=derive_seed(seed, "pretrain"),
                evaluate=None,
                constrained=False,
                progress=progress,
                on_log=on_log,
                max_steps_this_call=steps,
            )

        result = pretrain(0)
        for stop in [*snapshot_steps(cfg), tiny.pretrain_steps]:
            if stop > result.steps:
                result = pretrain(stop - result.steps)
            _keep_snapshot(model, tokenizer, out, stop, result.steps, tiny.pretrain_steps)
    return model, tokenizer, result


def _keep_snapshot(model, tokenizer, out: Path, stop: int, step: int, last: int) -> None:
    """Save the model as snapshot `step<stop>` when training stands at `stop` (a re-run finds the
    snapshots it saved before; one it lost cannot be recomputed without starting over)."""
    folder = out / SNAPSHOTS / f"step{stop}"
    if stop >= last or (folder / "config.json").is_file():
        return
    if step != stop:
        raise RuntimeError(f"snapshot {folder} is missing and pre-training is past it; delete {out} to start over")
    models.save_model(model, tokenizer, folder)


SNAPSHOTS = "snapshots"  # stage 0's folder of pre-training snapshots: snapshots/step<N>/


def snapshot_steps(cfg: ExperimentConfig) -> list[int]:
    """The pre-training steps at which stage 0 keeps a snapshot of a tiny model (those below the
    last step, in order)."""
    tiny = cfg.model.tiny
    return sorted({s for s in tiny.snapshot_steps if s < tiny.pretrain_steps})


MIN_FREE_BYTES = 1 << 30


def _raise_failed(checks: dict[str, Any]) -> None:
    """A failed check is the machine's or the input's problem, not a bug: say it without a traceback."""
    failed = [name for name, c in checks.items() if not c["ok"]]
    if failed:
        raise StageFailed("stage setup failed its checks: " + "; ".join(f"{n}: {checks[n]['detail']}" for n in failed))


def check_disk(cfg: ExperimentConfig) -> dict[str, Any]:
    """Free space under the runs folder (its nearest existing parent). Run before anything is
    downloaded, trained or written, so a full disk fails in a second, not after pre-training."""
    free = shutil.disk_usage(nearest_existing(cfg.paths.runs_root)).free
    checks = {
        "disk": {
            "ok": free > MIN_FREE_BYTES,
            "detail": f"{free / 2**30:.1f} GiB free under {cfg.paths.runs_root} "
            f"(at least {MIN_FREE_BYTES / 2**30:.0f} GiB needed)",
        }
    }
    _raise_failed(checks)
    return checks


def check_splits(cfg: ExperimentConfig, splits: data_lib.Splits) -> dict[str, Any]:
    """Checks on the final parts, measured from them again (not trusted from how they were cut):
    documents shared by any two parts, held-out documents above the contamination thresholds
    with respect to train, and enough attack texts for both attacks; run before any model is
    trained."""
    from monolm.data.contamination import verify_parts

    checks = verify_parts(splits.as_dict(), cfg.data.contamination)
    have = len(splits.attack)
    n_opt, n_held_out, _ = attack_text_budget(cfg)
    needed = n_opt + n_held_out
    checks["attack_texts"] = {"ok": have >= needed, "detail": f"{have} held-out attack texts, attacks need {needed}"}
    _raise_failed(checks)
    return checks


def verify(
    cfg: ExperimentConfig,
    model_path: Path,
    tokenizer,
    splits: data_lib.Splits,
    earlier: dict[str, Any] | None = None,
    contamination: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Checks that later stages rely on, each pass/fail with the reason; `earlier` holds the
    checks already passed before the model was fetched or built."""
    from transformers import AutoConfig

    checks: dict[str, Any] = dict(earlier or {})
    config = AutoConfig.from_pretrained(model_path)
    model_max = models.max_sequence_length(config)
    try:
        cfg.validate_seq_len(model_max)
        checks["seq_len"] = {"ok": True, "detail": f"data.seq_len={cfg.data.seq_len} <= model maximum {model_max}"}
    except ConfigError as exc:
        raise ConfigError(f"{exc} (model {cfg.model.name})") from None
    rows = config.vocab_size
    checks["vocab"] = {
        "ok": len(tokenizer) <= rows,
        "detail": f"tokenizer has {len(tokenizer)} tokens, embedding has {rows} rows ({rows - len(tokenizer)} unused)",
    }
    _raise_failed(checks)
    counts = {name: len(docs) for name, docs in splits.as_dict().items()}
    return {
        "checks": checks,
        "model_max_len": model_max,
        "embedding_rows": rows,
        "tokenizer_size": len(tokenizer),
        "docs": counts,
        "contamination": contamination,
    }


def held_out_summary(contamination: dict[str, Any]) -> dict[str, Any]:
    """The contamination counts per held-out part that the report states (verification.json has
    the full record)."""
    keys = ("candidates", "contaminated", "contamination_rate", "exact_duplicates", "kept", "requested")
    return {
        "ngram": contamination["settings"]["ngram"],
        "action": contamination["settings"]["action"],
        "parts": {part: {k: rec[k] for k in keys} for part, rec in contamination["parts"].items()},
    }


def _locate_model(cfg: ExperimentConfig) -> Path | None:
    """The base model's directory (hub models fetched into the HF cache); None for tiny and
    architecture (built in stage 0)."""
    if cfg.model.source in ("tiny", "architecture"):
        return None
    if cfg.model.source == "hub":
        return models.fetch_hub_model(cfg.model.name, cfg.model.revision, cfg.hf_cache_dir)
    path = Path(cfg.model.name).resolve()
    if not (path / "config.json").is_file():
        raise models.ModelUnavailable(f"model.name={cfg.model.name!r} is not a saved model directory")
    return path


def run(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 0 (no inputs); `on_log` receives the tiny model's pre-training log entries."""
    seed = cell.seed
    done = existing(cfg, cell, STAGE, inputs)
    if done:
        log.info("stage setup (seed %d) already complete: %s", seed, done.dir)
        return done
    started = time.time()
    # Inputs first: a full disk, a model id that does not exist, a bad corpus (empty, too small,
    # not UTF-8) or too few attack texts fails here, before the stage folder is created or
    # anything is trained or written into it.
    checks = check_disk(cfg)
    path = _locate_model(cfg)
    splits, contamination = data_lib.prepare_splits(cfg.data, seed, cache_dir=cfg.hf_cache_dir / "datasets")
    checks.update(check_splits(cfg, splits))
    out = prepare(cfg, cell, STAGE, inputs)
    outputs = [f"data/{name}" for name in data_lib.save_splits(splits, out / "data")]
    metrics: dict[str, Any] = {}
    if cfg.model.source in ("tiny", "architecture"):
        model, tokenizer, pretrain = _pretrain_tiny(cfg, seed, splits, out, progress, on_log)
        models.save_model(model, tokenizer, out / "model")
        path = out / "model"
        outputs += files_under(out, "model")
        if pretrain is not None:
            metrics["pretrain"] = {
                "steps": pretrain.steps,
                "tokens_seen": pretrain.tokens_seen,
                "final": pretrain.final_metrics,
            }
            shutil.rmtree(out / "pretrain" / "checkpoints", ignore_errors=True)
            outputs.append("pretrain/history.json")
            if (out / SNAPSHOTS).is_dir():
                outputs += files_under(out, SNAPSHOTS)
                metrics["snapshots"] = {p.name: str(p.resolve()) for p in sorted((out / SNAPSHOTS).iterdir())}
    else:
        tokenizer = models.load_tokenizer(path)
        # Weights live outside the stage folder (the HF cache); record their digests.
        metrics["model_files"] = {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}
    metrics["model_dir"] = str(Path(path).resolve())
    report = verify(cfg, Path(path), tokenizer, splits, checks, contamination)
    if cfg.model.random_weights:
        report["random_weights"] = metrics["random_weights"] = models.random_weights_note(model)
    atomic_write_json(out / "verification.json", report)
    outputs.append("verification.json")
    metrics.update(
        {
            "docs": report["docs"],
            "contamination": held_out_summary(contamination),
            "tokenizer_size": report["tokenizer_size"],
            "embedding_rows": report["embedding_rows"],
        }
    )
    return finish(cfg, cell, STAGE, inputs=inputs, outputs=outputs, metrics=metrics, started=started)


def load_setup(ref: StageRef):
    """(tokenizer, splits) of a finished setup stage."""
    return models.load_tokenizer(model_dir(ref)), data_lib.load_saved_splits(ref.path / "data")
