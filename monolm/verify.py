"""`monolm verify`: can stage 0 run here? Each check passes or fails with a reason, and none can
hang: every check runs under a deadline (offline, hub calls fail in seconds, not minutes)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monolm.artifacts import nearest_existing
from monolm.config import ExperimentConfig


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _with_deadline(fn: Callable[[], str], seconds: float) -> tuple[bool, str]:
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["detail"] = fn()
        except BaseException as exc:  # report any failure as the check's reason
            box["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return False, f"no answer within {seconds:.0f} s (network unreachable?)"
    if "error" in box:
        return False, str(box["error"])
    return True, str(box.get("detail", "ok"))


def run_checks(cfg: ExperimentConfig, timeout: float = 30.0) -> list[Check]:
    import os

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
    checks: list[Check] = []

    def add(name: str, fn: Callable[[], str], seconds: float = timeout) -> bool:
        ok, detail = _with_deadline(fn, seconds)
        checks.append(Check(name, ok, detail))
        return ok

    m, d = cfg.model, cfg.data
    if m.source == "hub" or d.source == "hub":

        def hub() -> str:
            from huggingface_hub import HfApi

            info = HfApi().model_info(m.name, revision=m.revision, timeout=10) if m.source == "hub" else None
            return f"reached the hub ({info.id}@{(info.sha or '')[:10]})" if info else "reached the hub"

        add("hub reachable", hub)
    if m.source == "tiny":
        add("model", lambda: "tiny GPT-NeoX is built offline in stage 0")
    elif m.source == "architecture":
        add("model", lambda: f"{m.architecture} is built offline in stage 0 with RANDOM weights (not pre-trained)")
    else:

        def model() -> str:
            from transformers import AutoConfig

            from monolm.models import max_sequence_length

            src = m.name if m.source == "hub" else str(Path(m.name).resolve())
            config = AutoConfig.from_pretrained(src, revision=m.revision, cache_dir=str(cfg.hf_cache_dir))
            cfg.validate_seq_len(max_sequence_length(config))
            return f"{config.model_type}, max length {max_sequence_length(config)}, vocab {config.vocab_size}"

        def tokenizer() -> str:
            from transformers import AutoTokenizer

            src = m.name if m.source == "hub" else str(Path(m.name).resolve())
            tok = AutoTokenizer.from_pretrained(src, revision=m.revision, cache_dir=str(cfg.hf_cache_dir))
            return f"{len(tok)} tokens"

        add("model config loadable", model)
        add("tokenizer loadable", tokenizer)

    def dataset() -> str:
        from monolm import data

        if d.source == "embedded":
            return f"{len(data.embedded_documents())} embedded documents"
        if d.source == "local":
            sp = data.load_splits(d.model_copy(update={"n_train_docs": 50, "n_eval_docs": 5, "n_attack_docs": 5}), 0)
            return f"local files readable ({len(sp.train)} train docs sampled)"
        import datasets

        for split in (d.train_split, d.eval_split, d.attack_split):
            row = next(iter(datasets.load_dataset(d.dataset, split=split, streaming=True)))
            if d.text_field not in row:
                raise KeyError(f"split {split!r} rows have no {d.text_field!r} field")
        return f"{d.dataset}: {d.train_split}/{d.eval_split}/{d.attack_split} readable"

    add("dataset readable", dataset, timeout * 2)

    def disk() -> str:
        root = nearest_existing(cfg.paths.runs_root)  # the file system the runs folder will be on
        free = shutil.disk_usage(root).free / 2**30
        need = 1 if m.source == "tiny" else 40
        if free < need:
            raise OSError(f"{free:.1f} GiB free under {root}, need about {need} GiB")
        return f"{free:.1f} GiB free under {root} (need about {need} GiB)"

    add("disk space", disk)
    return checks
