"""`monolm verify`: can stage 0 run here? Each check passes, fails with a reason, or is skipped,
and none can hang: every check runs under a deadline. The hub is probed once, with one TCP
connection: when it cannot be reached (no network, host unknown), the model and tokenizer checks
look only in the local Hugging Face cache and the dataset check fails at once, so an offline
machine gets its answer in seconds instead of minutes of retries."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from monolm.config import ExperimentConfig
from monolm.core.artifacts import nearest_existing
from monolm.core.errors import hub_offline

PROBE_SECONDS = 5.0  # connect + name lookup of the hub host


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped (could not be checked here, says why)
    detail: str
    next_step: str = ""  # a failed check: the one thing to do about it

    @property
    def status(self) -> str:
        return "SKIP" if self.ok is None else "PASS" if self.ok else "FAIL"


class Skipped(Exception):
    """Raised by a check that cannot be decided here (its message says why)."""


def _with_deadline(fn: Callable[[], str], seconds: float) -> tuple[bool | None, str]:
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["detail"] = fn()
        except Skipped as exc:
            box["skipped"] = str(exc)
        except BaseException as exc:  # report any failure as the check's reason
            box["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return False, f"no answer within {seconds:.0f} s (network unreachable?)"
    if "skipped" in box:
        return None, str(box["skipped"])
    if "error" in box:
        return False, str(box["error"])
    return True, str(box.get("detail", "ok"))


def hub_address() -> tuple[str, int]:
    """(host, port) of the Hugging Face endpoint (`HF_ENDPOINT`, default https://huggingface.co)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def probe_hub() -> str:
    """One TCP connection to the hub: raises OSError when the host is unknown or unreachable."""
    host, port = hub_address()
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise OSError(f"cannot connect to {host}:{port} ({exc.strerror or exc})") from None
    return f"{host}:{port} answers"


def run_checks(cfg: ExperimentConfig, timeout: float = 30.0) -> list[Check]:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
    checks: list[Check] = []

    def add(name: str, fn: Callable[[], str], seconds: float = timeout) -> bool | None:
        ok, detail = _with_deadline(fn, seconds)
        checks.append(Check(name, ok, detail, next_step(cfg, name) if ok is False else ""))
        return ok

    m, d = cfg.model, cfg.data
    network = {"down": False}
    if (m.source == "hub" or d.source == "hub") and hub_offline():
        network["down"] = True
        checks.append(Check("hub reachable", None, "HF_HUB_OFFLINE is set: the checks below use the local cache only"))
    elif m.source == "hub" or d.source == "hub":
        ok = add("hub reachable", _hub_check(cfg, network), timeout)
        network["down"] = network["down"] or ok is False and checks[-1].detail.startswith("no answer")
        if network["down"]:
            checks[-1].detail += "; the checks below use the local cache only"
    offline = network["down"]
    if m.source == "tiny":
        add("model", lambda: "tiny GPT-NeoX is built offline in stage 0")
    elif m.source == "architecture":
        add("model", lambda: f"{m.architecture} is built offline in stage 0 with RANDOM weights (not pre-trained)")
    else:
        add("model config loadable", _model_check(cfg, offline))
        add("tokenizer loadable", _tokenizer_check(cfg, offline))
    add("constraint variant", _variant_check(cfg))
    add("dataset readable", _dataset_check(cfg, offline), timeout * 2)
    add("disk space", _disk_check(cfg))
    return checks


def next_step(cfg: ExperimentConfig, check: str) -> str:
    """What to do about a failed check, in one sentence naming the setting or command."""
    m, d = cfg.model, cfg.data
    cache = cfg.hf_cache_dir
    steps = {
        "hub reachable": "check the network and proxy (HTTPS_PROXY, HF_ENDPOINT); on a machine without network set "
        "HF_HUB_OFFLINE=1 and use a filled cache or local copies",
        "constraint variant": "choose a constraint variant this architecture has (`--variants all` runs every one)",
        "disk space": f"free space under {cfg.paths.runs_root} or set paths.runs_root to a larger file system",
    }
    if m.source == "hub":
        model = (
            f"fill the cache on a machine with network (`hf download {m.name} --revision {m.revision} "
            f"--cache-dir {cache}`, then copy {cache} here), or use a saved copy: "
            "--set model.source=local --set model.name=DIR"
        )
    else:
        model = "set model.name to a folder holding config.json, the tokenizer files and *.safetensors weights"
    steps["model config loadable"] = steps["tokenizer loadable"] = model
    if d.source == "hub":
        steps["dataset readable"] = (
            "point data.source at a local copy: --set data.source=local --set data.dataset=DIR "
            "(<split>.jsonl files with a text field)"
        )
    else:
        steps["dataset readable"] = f"check data.dataset (a folder of <split>.jsonl files with field {d.text_field!r})"
    return steps.get(check, "")


def _behind_proxy() -> bool:
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"))


def _hub_check(cfg: ExperimentConfig, network: dict[str, bool]) -> Callable[[], str]:
    """Probe the hub once (a TCP connection; behind a proxy, the API call itself) and look the
    model up. `network["down"]` is set when no answer came at all, as opposed to an HTTP error
    (a private or misspelt model: the hub is there)."""

    def hub() -> str:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            reached = "" if _behind_proxy() else probe_hub()
            if cfg.model.source != "hub":
                return f"reached the hub ({reached or 'through the proxy'})"
            from huggingface_hub import HfApi

            info = HfApi().model_info(cfg.model.name, revision=cfg.model.revision, timeout=10)
        except HfHubHTTPError:
            raise
        except Exception:  # no connection, name lookup failed, timed out
            network["down"] = True
            raise
        return f"reached the hub ({info.id}@{(info.sha or '')[:10]})"

    return hub


def _source(cfg: ExperimentConfig) -> str:
    return cfg.model.name if cfg.model.source == "hub" else str(Path(cfg.model.name).resolve())


def _not_cached(cfg: ExperimentConfig, offline: bool, exc: Exception) -> Exception:
    if offline and cfg.model.source == "hub":
        return RuntimeError(f"{cfg.model.name!r} is not in the local cache {cfg.hf_cache_dir}; {_why_offline()}")
    return exc


def _why_offline() -> str:
    return "HF_HUB_OFFLINE is set" if hub_offline() else "the hub is unreachable"


def _from_pretrained(auto: Any, cfg: ExperimentConfig, offline: bool) -> Any:
    """`auto.from_pretrained` (AutoConfig, AutoTokenizer) of the configured model, revision and
    cache; a model missing from the cache while offline says so and why."""
    try:
        return auto.from_pretrained(
            _source(cfg), revision=cfg.model.revision, cache_dir=str(cfg.hf_cache_dir), local_files_only=offline
        )
    except OSError as exc:
        raise _not_cached(cfg, offline, exc) from None


def _model_check(cfg: ExperimentConfig, offline: bool) -> Callable[[], str]:
    def model() -> str:
        from transformers import AutoConfig

        from monolm.models.loading import max_sequence_length

        config = _from_pretrained(AutoConfig, cfg, offline)
        cfg.validate_seq_len(max_sequence_length(config))
        return f"{config.model_type}, max length {max_sequence_length(config)}, vocab {config.vocab_size}"

    return model


def _tokenizer_check(cfg: ExperimentConfig, offline: bool) -> Callable[[], str]:
    def tokenizer() -> str:
        from transformers import AutoTokenizer

        return f"{len(_from_pretrained(AutoTokenizer, cfg, offline))} tokens"

    return tokenizer


def _variant_check(cfg: ExperimentConfig) -> Callable[[], str]:
    def variant() -> str:
        from monolm.models.shape import check_variant

        fits = check_variant(cfg)
        if fits is None:
            raise Skipped(f"{cfg.constraint.variant}: the model's config.json is not here yet (stage 1 checks it)")
        return fits

    return variant


def _dataset_check(cfg: ExperimentConfig, offline: bool) -> Callable[[], str]:
    d = cfg.data

    def dataset() -> str:
        from monolm.data import splits as data

        if d.source == "embedded":
            return f"{len(data.embedded_documents())} embedded documents"
        if d.source == "local":
            small = {"n_train_docs": 50, "n_val_docs": 5, "n_test_docs": 5, "n_attack_docs": 5}
            quiet = logging.getLogger("monolm.data")  # the sample's part sizes are not the run's
            level, quiet.level = quiet.level, logging.WARNING
            try:
                sp = data.load_splits(d.model_copy(update=small), 0)
            finally:
                quiet.setLevel(level)
            return f"local files readable ({len(sp.train)} train docs sampled)"
        if offline:
            raise ConnectionError(f"{d.dataset} is streamed from the hub; {_why_offline()}")
        import datasets

        splits = list(dict.fromkeys((d.train_split, d.val_split, d.test_split, d.attack_split)))
        for split in splits:
            row = next(iter(datasets.load_dataset(d.dataset, split=split, streaming=True)))
            if d.text_field not in row:
                raise KeyError(f"split {split!r} rows have no {d.text_field!r} field")
        return f"{d.dataset}: {'/'.join(splits)} readable"

    return dataset


def _disk_check(cfg: ExperimentConfig) -> Callable[[], str]:
    def disk() -> str:
        root = nearest_existing(cfg.paths.runs_root)  # the file system the runs folder will be on
        free = shutil.disk_usage(root).free / 2**30
        need = 1 if cfg.model.source == "tiny" else 40
        if free < need:
            raise OSError(f"{free:.1f} GiB free under {root}, need about {need} GiB")
        return f"{free:.1f} GiB free under {root} (need about {need} GiB)"

    return disk
