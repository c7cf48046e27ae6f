"""Security: nothing untrusted is ever unpickled, and no credentials live in the repository.

The pickle tests plant a payload that *would* create a marker directory if it were ever
unpickled (a positive control shows that it does, in a throwaway process) wherever monolm
expects a checkpoint, a model or an attack unit, and show it is refused and the marker never
appears. Servers binding to loopback are proven with real servers in `tests/test_infra_scripts.py`
(`test_prefect_server_sqlite_on_loopback`, `test_postgres_cluster_and_prefect_server_on_it`
check every listening socket is 127.0.0.1), not repeated here.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monolm.core.artifacts import sha256_file
from monolm.training.checkpoint import list_checkpoints
from resilience.helpers import ENV, REPO
from resilience.trainruns import finish

pytestmark = pytest.mark.resilience


class _Payload:
    """Unpickling this calls os.mkdir(marker): harmless, and impossible to miss."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def torch_pickle(marker: Path, path: Path) -> None:
    """A real `torch.save` file (zip + pickle) that executes the payload on a full `torch.load`."""
    torch.save({"state": _Payload(marker)}, path)


def test_the_payload_is_live(tmp_path):
    """Positive control, in a throwaway process: unpickling the planted bytes does create the
    marker, so the marker's absence in the other tests means nothing was unpickled."""
    raw, zipped = tmp_path / "raw.pkl", tmp_path / "zipped.pt"
    raw.write_bytes(payload(tmp_path / "raw-ran"))
    torch_pickle(tmp_path / "torch-ran", zipped)
    code = (
        "import pickle, sys, torch; pickle.loads(open(sys.argv[1], 'rb').read()); "
        "torch.load(sys.argv[2], weights_only=False)"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(raw), str(zipped)], check=True, env=ENV, cwd=tmp_path, capture_output=True
    )
    assert (tmp_path / "raw-ran").is_dir() and (tmp_path / "torch-ran").is_dir()
    # and what monolm's rule (weights_only=True) does with it:
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(zipped, weights_only=True)


def _plant_checkpoint(real: Path, target: Path, marker: Path, *, consistent: bool) -> None:
    """A checkpoint folder whose tensor files are pickles. `consistent`: the attacker also wrote
    a checkpoint.json with the right step, the victim's fingerprint and the planted files' sha256,
    so the integrity check alone cannot reject it."""
    target.mkdir()
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        torch_pickle(marker, target / name)
    for name in ("optimizer.json", "state.json"):
        shutil.copy(real / name, target / name)
    if consistent:
        manifest = json.loads((real / "checkpoint.json").read_text())
        step = int(target.name.split("-")[1])
        manifest["step"] = step
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(target.iterdir())}
        (target / "checkpoint.json").write_text(json.dumps(manifest))


def test_pickle_planted_as_the_newest_checkpoint_is_never_unpickled(tmp_path, reference):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(reference(False), out)
    ckpts = out / "checkpoints"
    (_, newest), *_ = list_checkpoints(ckpts)[::-1]
    for _, path in list_checkpoints(ckpts)[:-1]:
        shutil.rmtree(path)  # keep only step 12: the planted "step 99" is the newest

    # 1. Pickles without a matching checkpoint.json: skipped, the run resumes from step 12.
    _plant_checkpoint(newest, ckpts / "step-00000099", marker, consistent=False)
    result, text = finish(out, tag="plain")
    assert result["resumed_from"] == str(newest) and "skipping checkpoint" in text and "step-00000099" in text
    assert not marker.exists()

    # 2. With a forged, self-consistent checkpoint.json: the digests match, but the tensor files
    #    are not safetensors, so the checkpoint is skipped all the same and the run resumes from 12.
    shutil.rmtree(ckpts / ".invalid", ignore_errors=True)
    _plant_checkpoint(newest, ckpts / "step-00000098", marker, consistent=True)
    result, text = finish(out, tag="forged")
    assert result["resumed_from"] == str(newest), text[-3000:]
    assert "skipping checkpoint" in text and "step-00000098" in text and "not a safetensors file" in text
    assert not marker.exists()


def test_pickled_weights_in_a_model_folder_are_refused(tmp_path, micro_pipeline):
    """A model folder (a stage's `best/`) whose safetensors weights were swapped for a pickled
    `pytorch_model.bin`, as an old checkpoint or a malicious upload would have them."""
    from monolm.models.loading import ModelError, load_model
    from resilience.helpers import seed_dir

    model_dir = tmp_path / "model"
    shutil.copytree(seed_dir(micro_pipeline) / "train_baseline" / "best", model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch_pickle(marker, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelError, match=str(model_dir)):
        load_model(model_dir)
    assert not marker.exists()


def test_pickle_as_an_attack_unit_is_recomputed_not_loaded(tmp_path):
    from monolm.attacks import units

    marker = tmp_path / "PWNED"
    path = units.unit_path(tmp_path, "uat", 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload(marker))
    assert units.read_unit(tmp_path, "uat", 0, key="k") is None
    assert not marker.exists()


LOADERS = re.compile(
    r"\b(pickle\.loads?|cloudpickle\.loads?|dill\.loads?|joblib\.load|torch\.load|np\.load|"
    r"numpy\.load|pandas\.read_pickle|pd\.read_pickle)\s*\("
)


def test_library_code_has_no_pickle_loader():
    """Every loader in monolm/, tasks/, flows/, deployments/, infra/ is listed here; `torch.load`
    only with weights_only=True and `np.load` never with allow_pickle=True."""
    found = []
    for folder in ("monolm", "tasks", "flows", "deployments", "infra"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                match = LOADERS.search(code)
                if not match:
                    continue
                safe = ("torch.load" in match.group(1) and "weights_only=True" in code) or (
                    match.group(1).endswith("np.load") and "allow_pickle" not in code
                )
                if not safe:
                    found.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert found == [], found


# --------------------------------------------------------------------------- credentials
def _secret_patterns() -> dict[str, re.Pattern]:
    # Built from pieces so this file does not match itself.
    begin = "-----" + "BEGIN"
    return {
        "private key": re.compile(begin + r" (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY"),
        "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://([^\s:/@'\"<>]+):([^\s@/'\"]+)@[\w.-]+"),
        "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
        "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
        "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
        "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
        "API key": re.compile(r"\bsk-[A-Za-z0-9_-]{32,}\b"),
        "assigned secret": re.compile(
            r"(?i)\b(?:password|passwd|secret|api[_-]?key|token)\s*[:=]\s*['\"]([^'\"\s]{8,})['\"]"
        ),
    }


# Documentation placeholders, not secrets: shell/format variables, <password>, user:pw examples.
_PLACEHOLDER = re.compile(
    r"^(?:\$\{?[\w:-]+\}?|%s|%\(\w+\)s|<[^>]*>|\{[^}]*\}|\*+|x+|\.\.\.|pw|pwd|pass|password|"
    r"secret|changeme|example|PASSWORD|\$\w+.*)$"
)


def scan(text: str) -> list[str]:
    hits = []
    for name, pattern in _secret_patterns().items():
        for match in pattern.finditer(text):
            if name == "password in a URL" and (
                _PLACEHOLDER.match(match.group(2)) or "$" in match.group(2) or "%" in match.group(2)
            ):
                continue
            if name == "assigned secret" and (_PLACEHOLDER.match(match.group(1)) or "$" in match.group(1)):
                continue
            hits.append(f"{name}: {match.group(0)[:60]}")
    return hits


def repo_files() -> list[Path]:
    """Tracked files plus untracked files that are not ignored (the next commit's candidates)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [REPO / name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def test_scanner_catches_each_kind_of_secret():
    samples = {
        "private key": "-----" + "BEGIN RSA PRIVATE KEY-----\nMIIE...",
        "password in a URL": "url = 'postgresql://prefect:" + "s3cr3tPassw0rd@db.example.org/prefect'",
        "Hugging Face token": "HF_TOKEN=hf_" + "a" * 34,
        "GitHub token": "token ghp_" + "B" * 36,
        "AWS access key": "AKIA" + "ABCDEFGHIJKLMNOP",
        "Slack token": "xoxb-" + "1234567890-abcdef",
        "API key": "key = sk-" + "c" * 40,
        "assigned secret": 'password = "' + 'hunter2hunter2"',
    }
    for name, text in samples.items():
        assert any(hit.startswith(name) for hit in scan(text)), name
    for harmless in (
        "postgresql+asyncpg://%s:%s@127.0.0.1:%s/%s",
        "postgresql://prefect:<password>@127.0.0.1/x",
        'url="postgresql://${USER}:${PGPASSWORD}@host/db"',
        "http://127.0.0.1:4200/api",
        'password = "$(cat "$PW_FILE")"',
    ):
        assert scan(harmless) == [], harmless


def test_no_credentials_in_the_repository():
    files = repo_files()
    assert len(files) > 50
    named = [
        f
        for f in files
        if f.name in (".env", "id_rsa", "id_ed25519", ".netrc", ".pgpass")
        or f.suffix in (".pem", ".key", ".p12", ".pfx")
    ]
    assert named == [], named
    hits = []
    for path in files:
        if path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(REPO)}: {hit}" for hit in scan(text)]
    assert hits == [], hits
