"""Bad inputs, as a user hits them: `monolm run --no-prefect ...`. Each case checks the exit code,
that the message names the problem (field, value, file:line, model id), that no traceback is
printed, and that *nothing* was written: the working directory (where runs, caches and Prefect
state would go) holds exactly the files the test put there.

Every case runs through `flows.cli.main`, the command line's own entry point; a representative
subset also runs as a separate `monolm` process (each costs a ~3 s interpreter start), so the
catalogue stays fast while the process-level behaviour (exit status, stderr) is still proven.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import micro_sets

from resilience.helpers import fork_worker, micro_argv, run_cli, seed_dir, snapshot

pytestmark = pytest.mark.resilience

RUN = ["run", "--no-prefect", "-q"]


def refused(cwd: Path, argv: list[str], code: int, *needles: str, env: dict | None = None, process: bool = True) -> str:
    """Run `monolm <argv>` in `cwd` (a separate process, or `cli.main` in this one) and check the
    refusal: exit code, message, no traceback, nothing written."""
    before = snapshot(cwd)
    if process:
        got, out = run_cli(argv, cwd=cwd, env=env)
    else:
        from flows.cli import main

        buffer = io.StringIO()
        previous = Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(buffer):
                got = main(argv)
        finally:
            os.chdir(previous)
        out = buffer.getvalue()
    assert got == code, f"exit {got}, wanted {code}:\n{out[-4000:]}"
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    assert snapshot(cwd) == before, "a refused run wrote files"
    return out


# --------------------------------------------------------------------------- configuration (no compute)
# name -> (the arguments, or the one `--set` setting, as a string; what the message must say)
CONFIG_CASES = {
    "unknown preset": (["--preset", "huge"], ["unknown preset 'huge'", "allowed: full, quick, tiny"]),
    "unknown variant": (["--variant", "mlp_everything"], ["constraint.variant", "not an allowed value"]),
    "unknown named override": (["--override", "faster"], ["unknown named override 'faster'", "reference"]),
    "unknown field": (
        "training.common.learning_rate=1e-4",
        ["training.common.learning_rate: unknown setting; did you mean 'lr'?"],
    ),
    "override without '='": ("training.common.lr", ["invalid override: expected KEY=VALUE"]),
    "override with empty key part": ("training..lr=1", ["invalid override: expected KEY=VALUE"]),
    "override with empty key": ("=1", ["invalid override: expected KEY=VALUE"]),
    "override value not YAML": ("seeds=[1,", ["seeds: value is not valid YAML"]),
    "string for an integer": (
        "training.common.micro_batch_size=abc",
        ["training.common.micro_batch_size", "valid integer", "got a str"],
    ),
    "float for an integer": (
        "training.common.grad_accum_steps=2.5",
        ["training.common.grad_accum_steps", "valid integer"],
    ),
    "string for a rate": ("training.common.lr=fast", ["training.common.lr", "got a str"]),
    "string for a boolean": ("attacks.hotflip.random_control=maybe", ["attacks.hotflip.random_control", "got a str"]),
    "scalar for a list": ("seeds=oops", ["seeds", "got a str"]),
    "zero learning rate": ("training.common.lr=0", ["training.common.lr", "greater than 0"]),
    "negative learning rate": ("training.common.lr=-1e-4", ["training.common.lr", "greater than 0", "-0.0001"]),
    "zero batch size": ("training.common.micro_batch_size=0", ["training.common.micro_batch_size", "greater than 0"]),
    "negative seq len": ("data.seq_len=-5", ["data.seq_len", "greater than 0"]),
    "zero hidden size": ("model.tiny.hidden_size=0", ["model.tiny.hidden_size", "greater than 0"]),
    "zero trigger length": ("attacks.uat.trigger_len=0", ["attacks.uat.trigger_len", "greater than 0"]),
    "zero HotFlip block": ("attacks.hotflip.block_size=0", ["attacks.hotflip.block_size"]),
    "negative eval batch": ("evaluation.batch_size=-1", ["evaluation.batch_size", "greater than 0"]),
    "warmup ratio above 1": (
        "training.common.warmup_ratio=1.5",
        ["training.common.warmup_ratio", "less than or equal to 1"],
    ),
    "zero success threshold": ("attacks.success_threshold=0", ["attacks.success_threshold"]),
    "seq len above the model maximum": (
        "data.seq_len=999",
        ["data.seq_len=999 exceeds the model's maximum sequence length 256"],
    ),
    "eval window above the model maximum": (
        "evaluation.seq_len=300",
        ["evaluation.seq_len=300 exceeds the model's maximum"],
    ),
    "attack text above the model maximum": (
        "attacks.hotflip.text_max_tokens=300",
        ["attacks.hotflip.text_max_tokens=300 exceeds"],
    ),
    "trigger longer than the texts": (
        ["--set", "attacks.uat.trigger_len=60", "--set", "attacks.uat.text_max_tokens=48"],
        ["attacks.uat.trigger_len=60 is not shorter than the texts it attacks"],
    ),
    "too few attack texts": ("data.n_attack_docs=5", ["data.n_attack_docs=5 is too small"]),
    "heads do not divide hidden size": ("model.tiny.num_heads=3", ["divisible by model.tiny.num_heads=3"]),
    "unfair per-arm recipe": ("training.monotonic.lr=1e-3", ["training.monotonic.lr=0.001", "training.recipe='fair'"]),
    "duplicate seeds": (["--seeds", "1", "1"], ["seeds=[1, 1] contains duplicates"]),
    "evaluation on the training split": (
        "data.test_split=train",
        ["data.test_split='train' and data.train_split='train' point the test part and the train part"],
    ),
}


IN_A_PROCESS = {
    "unknown preset",
    "unknown variant",
    "override without '='",
    "string for an integer",
    "negative learning rate",
    "seq len above the model maximum",
    "trigger longer than the texts",
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_errors_are_refused_before_anything_runs(tmp_path, name):
    """Exit 2, the field named (never its value: it may be a token pasted in the wrong place), nothing written."""
    args, needles = CONFIG_CASES[name]
    args = ["--set", args] if isinstance(args, str) else args
    refused(
        tmp_path,
        [*RUN, *args, "--set", f"paths.runs_root={tmp_path / 'runs'}"],
        2,
        *needles,
        process=name in IN_A_PROCESS,
    )


def test_config_file_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"training:\n  common:\n    lr: \xff\xfe\n")
    refused(tmp_path, [*RUN, "--config", str(bad)], 2, f"{bad} is not valid YAML", process=False)
    refused(
        tmp_path,
        [*RUN, "--config", str(tmp_path / "missing.yaml")],
        2,
        f"file {tmp_path / 'missing.yaml'} does not exist",
        process=False,
    )
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    refused(tmp_path, [*RUN, "--config", str(listed)], 2, "must contain a mapping, got list", process=False)


# --------------------------------------------------------------------------- data (stage 0 input)
def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _doc(i: int, chars: int = 400) -> str:
    return (f"Document {i} talks about topic {i} at length. " * 40)[:chars]


def test_bad_corpora_are_refused_before_the_stage_folder_exists(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    few = _jsonl(tmp_path / "few.jsonl", [_doc(i) for i in range(3)])
    short = _jsonl(tmp_path / "short.jsonl", [_doc(i, 50) for i in range(40)])
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(json.dumps({"text": _doc(0)}).encode() + b"\n" + b'{"text": "caf\xe9 au lait"}\n')
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text(json.dumps({"text": _doc(0)}) + '\n{"text": "unterminated\n')
    no_text = _jsonl(tmp_path / "fields.jsonl", [])
    no_text.write_text(json.dumps({"content": _doc(0)}) + "\n")
    cases = {
        empty: ["corpus too small: 0 documents"],
        few: ["corpus too small: 3 documents"],
        short: ["corpus too small: 0 documents of >= 200 characters"],
        not_utf8: [f"{not_utf8}:2: not valid UTF-8"],
        not_json: [f"{not_json}:2: not valid JSON"],
        no_text: [f"{no_text}:1: row has no field 'text'"],
        tmp_path / "missing.jsonl": [f"data.dataset={str(tmp_path / 'missing.jsonl')!r}: no such file or directory"],
    }
    for corpus, needles in cases.items():
        argv = [
            *RUN,
            "--set",
            "data.source=local",
            "--set",
            f"data.dataset={corpus}",
            "--set",
            f"paths.runs_root={tmp_path / 'runs'}",
        ]
        refused(tmp_path, argv, 2, *needles, process=corpus in (empty, not_utf8))
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- models
QUICK_EMBEDDED = [
    "--preset",
    "quick",
    "--set",
    "data.source=embedded",
    "--set",
    "data.n_attack_docs=100",
    "--set",
    "attacks.uat.n_opt_texts=20",
    "--set",
    "attacks.uat.n_eval_texts=40",
    "--set",
    "attacks.hotflip.n_texts=40",
]


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE=1", "hub unreachable"])
def test_model_id_that_does_not_exist_fails_fast_naming_it(tmp_path, network):
    env = (
        {"HF_HUB_OFFLINE": "1"}
        if network == "HF_HUB_OFFLINE=1"
        else {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    )  # nothing listens on port 9
    start = time.monotonic()
    refused(
        tmp_path,
        [
            *RUN,
            *QUICK_EMBEDDED,
            "--set",
            "model.name=no-such-org/no-such-model-7",
            "--set",
            f"paths.runs_root={tmp_path / 'runs'}",
        ],
        2,
        "'no-such-org/no-such-model-7'",
        env=env,
    )
    assert time.monotonic() - start < 60


def test_local_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    refused(
        tmp_path,
        [
            *RUN,
            *QUICK_EMBEDDED,
            "--set",
            "model.source=local",
            "--set",
            f"model.name={tmp_path / 'notamodel'}",
            "--set",
            f"paths.runs_root={tmp_path / 'runs'}",
        ],
        2,
        "stopped before stage 0, nothing was run",  # the pre-flight site check catches it, in seconds
        "FAIL model config loadable",
        "next: set model.name to a folder holding config.json",  # names the field and what to do
        process=False,
    )


# --------------------------------------------------------------------------- folders
@pytest.fixture
def readonly_folder(tmp_path):
    """A folder nobody may write: a read-only tmpfs when root (root ignores permission bits), a
    0555 folder otherwise. Yields (path, the reason `monolm` should give)."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)], capture_output=True
            ).returncode
            == 0
        )
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only file system")
    else:
        readonly.chmod(0o555)
    try:
        yield readonly, "read-only file system" if mounted else "permission denied"
    finally:
        if mounted:
            subprocess.run(["umount", str(readonly)], check=True)
        readonly.chmod(0o755)


@pytest.mark.parametrize("setting", ["paths.runs_root", "paths.results_root"])
def test_output_folder_that_is_not_writable_is_refused_before_any_compute(tmp_path, readonly_folder, setting):
    """An unwritable runs folder, or results folder (written only by stage 7, after every seed
    has trained and been attacked), is refused up front, naming the setting and the reason."""
    readonly, reason = readonly_folder
    target = readonly / "out"
    argv = ["run", "-q"]  # the flow's path: refused before a Prefect server is even started
    for assignment in micro_sets(tmp_path, f"{setting}={target}"):
        argv += ["--set", assignment]
    start = time.monotonic()
    refused(tmp_path, argv, 2, f"{setting}={str(target)!r}: cannot write under {readonly} ({reason})", process=False)
    assert time.monotonic() - start < 30  # a config-level refusal: nothing was computed
    assert list(readonly.iterdir()) == []


def test_runs_root_that_becomes_unwritable_fails_the_stage_naming_the_folder(tmp_path, readonly_folder, monkeypatch):
    """The same folder turning read-only after the up-front checks (a remount, a quota) still
    fails cleanly: the stage names the folder and the setting, and nothing half-written stays."""
    import flows.cli as cli
    from monolm.data import stage as setup
    from monolm.study import site_checks

    readonly, _ = readonly_folder
    monkeypatch.setattr(cli, "check_output_folders", lambda *a, **k: None)  # passed, then the mount changed
    monkeypatch.setattr(setup, "MIN_FREE_BYTES", 0)  # the tiny tmpfs would fail the free-space check first
    # ... and the pre-flight site check's (right for a 64k tmpfs, but this one stands for a large disk)
    monkeypatch.setattr(site_checks, "_disk_check", lambda cfg: lambda: "free space not checked here")
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        code = cli.main([*micro_argv(tmp_path), "--set", f"paths.runs_root={readonly / 'runs'}"])
    text = out.getvalue()
    assert code == 1, text[-3000:]
    assert "stage setup (seed 42) failed: cannot write" in text and "paths.runs_root" in text, text[-3000:]
    assert "Traceback" not in text
    assert list(readonly.iterdir()) == []


def test_too_little_free_disk_is_refused_before_pretraining(tmp_path, monkeypatch):
    """Stage 0 checks free space before it downloads or pre-trains anything."""
    from monolm.data import stage as setup

    monkeypatch.setattr(setup, "MIN_FREE_BYTES", 1 << 62)
    monkeypatch.setattr(setup, "_pretrain_tiny", lambda *a, **k: pytest.fail("pre-trained despite a full disk"))
    out = refused(
        tmp_path, micro_argv(tmp_path), 1, "stage setup failed its checks: disk:", "GiB free under", process=False
    )
    assert f"at least {2**32} GiB needed" in out


# --------------------------------------------------------------------------- checkpoints of another run
def test_checkpoint_of_a_different_model_is_refused_naming_the_mismatch(tmp_path, micro_pipeline):
    """A checkpoint of another model and recipe copied into a stage's checkpoints folder (same
    stage work key, so it would be resumed): the run stops with exit 2, names what differs and
    writes nothing; the library call says the same."""
    other = tmp_path / "other"
    fork_worker("train", {"out": str(other)}, tmp_path / "other.log").finish()
    foreign = other / "checkpoints" / "step-00000009"

    root = tmp_path / "copy"
    shutil.copytree(micro_pipeline / "runs", root / "runs")
    stage = seed_dir(root) / "train_baseline"
    (stage / "manifest.json").unlink()  # the stage is unfinished: it will look for a checkpoint
    shutil.copytree(foreign, stage / "checkpoints" / foreign.name)
    refused(
        root,
        micro_argv(root, stages=3),
        2,
        f"checkpoint {stage / 'checkpoints' / foreign.name} was written by "
        "a different model/recipe/run and cannot be resumed",
        "config.lr: checkpoint 0.003 vs now 0.0005",
        "tensor(s) differ in dtype/shape",
    )

    # Library level: a smaller model resumed into the finished run's folder.
    before = snapshot(other)
    proc = fork_worker("train", {"out": str(other), "hidden": 32}, tmp_path / "small.log")
    assert proc.wait() == 1
    assert "CheckpointMismatch" in proc.output() and "gpt_neox.embed_in.weight" in proc.output()
    assert snapshot(other) == before
