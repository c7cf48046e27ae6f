"""The command line as a user meets it: clear refusals before any compute, offline checks that
fail fast instead of hanging."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

MONOLM = [sys.executable, "-m", "flows.cli"]


def monolm(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MONOLM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_bad_config_refused_before_anything_is_written(tmp_path):
    out = monolm(
        "run",
        "--no-prefect",
        "--preset",
        "tiny",
        "--set",
        "data.seq_len=999",
        "--set",
        f"paths.runs_root={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "data.seq_len=999 exceeds the model's maximum sequence length 256" in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".state").exists()

    out = monolm("run", "--preset", "tiny", "--variant", "mlp_everything", cwd=tmp_path)
    assert out.returncode == 2 and "constraint.variant" in out.stderr and "'mlp_both'" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_config_is_refused_without_loading_torch(tmp_path):
    """A typo in a setting is answered at once: validation never waits for torch to import."""
    probe = (
        "import sys; from flows.cli import main; code = main(['run', '--set', 'training.common.lr=0']); "
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "training.common.lr" in out.stderr
    assert out.stdout.strip() == "torch not loaded"


def test_config_show_prints_the_resolved_config(tmp_path):
    out = monolm("config", "show", "--preset", "full", "--override", "reference", cwd=tmp_path)
    assert out.returncode == 0 and "recipe: reference" in out.stdout and "EleutherAI/pythia-1.4b" in out.stdout


@pytest.mark.parametrize(
    "endpoint, reason",
    [("http://127.0.0.1:9", "Connection refused"), ("http://no-such-host.invalid", "no-such-host.invalid")],
    ids=["refused", "host-unknown"],
)
def test_verify_offline_fails_fast_and_clearly(tmp_path, endpoint, reason):
    """No network: the hub is probed once, the model/tokenizer checks look in the local cache only
    and the dataset check fails at once; no retries (each used to print a line and sleep)."""
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}
    start = time.time()
    out = monolm("verify", "--preset", "full", "--timeout", "20", cwd=tmp_path, env=env, timeout=200)
    elapsed = time.time() - start
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL  hub reachable" in out.stdout and reason in out.stdout
    assert "FAIL  model config loadable" in out.stdout and "not in the local cache" in out.stdout
    assert "FAIL  dataset readable" in out.stdout and "unreachable" in out.stdout
    # each FAIL line is followed by what to do next
    lines = out.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("FAIL"):
            assert lines[i + 1].lstrip().startswith("next: "), out.stdout
    assert "--set data.source=local" in out.stdout and "hf download EleutherAI/pythia-1.4b" in out.stdout
    assert "PASS  disk space" in out.stdout and out.stdout.splitlines()[-1].startswith("1 passed, 4 failed")
    assert "Retry" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert elapsed < 15, f"verify took {elapsed:.1f} s offline"


def test_run_offline_with_a_hub_preset_fails_in_seconds_naming_the_cause(tmp_path):
    """Issue 24: `monolm run --preset quick` offline with an empty cache used to take 38 s and 299
    lines (setup retried 3 times, 6 tracebacks). The site checks of `monolm verify` now run before
    the flow starts: a few lines, the cause and the next step, no Prefect server, no traceback."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PREFECT_HOME": str(tmp_path / "prefect")}
    sets = ["--set", f"paths.runs_root={tmp_path / 'runs'}", "--set", f"paths.cache_dir={tmp_path / 'cache'}"]
    start = time.time()
    out = monolm("run", "--preset", "quick", "--seeds", "42", "-q", *sets, cwd=tmp_path, env=env, timeout=200)
    elapsed = time.time() - start
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "stopped before stage 0" in out.stderr and "'EleutherAI/pythia-1.4b' is not in the local cache" in text
    assert "HF_HUB_OFFLINE is set" in text and "next: " in text
    assert "Traceback" not in text and "Retry" not in text and "Starting temporary server" not in text
    assert len(text.splitlines()) <= 10, text
    assert not (tmp_path / "prefect").exists() and not list((tmp_path / "runs").glob("quick/*"))
    assert elapsed < 30, f"took {elapsed:.1f} s to fail"


def test_permanent_errors_are_not_retried():
    """The stages' retry condition: configuration, a model not cached offline and unusable data
    fail at once; anything else (a lost worker, a hub 502) is retried as before."""
    from prefect.states import Failed

    from monolm.config import ConfigError
    from monolm.data.splits import DataError
    from monolm.models.loading import ModelError, ModelUnavailable
    from tasks.common import retry_unless_permanent

    def retried(exc: BaseException) -> bool:
        return retry_unless_permanent(None, None, Failed(data=exc))

    wrapped = RuntimeError("stage setup failed")
    wrapped.__cause__ = ModelUnavailable("not cached")
    assert not any(retried(e) for e in (ConfigError("x"), DataError("x"), ModelUnavailable("x"), wrapped))
    assert retried(RuntimeError("worker lost")) and retried(ModelError("502 from the hub"))


def test_verify_tiny_passes_offline(tmp_path):
    out = monolm("verify", "--preset", "tiny", cwd=tmp_path)
    assert out.returncode == 0, out.stdout
    assert "FAIL" not in out.stdout


def test_results_filters_by_arm_and_still_takes_model_for_one_release(tmp_path):
    from monolm.store import ResultsStore

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    with ResultsStore(url) as store:
        store.record_run(
            {"run_id": "r1", "run_name": "cli-run", "preset": "tiny"},
            [
                {"seed": 42, "arm": arm, "stage": "evaluate", "metric": "token_perplexity", "value": value}
                for arm, value in (("baseline", 21.5), ("monotonic", 23.25))
            ],
        )
    by_arm = monolm("results", "--store", url, "--arm", "monotonic", cwd=tmp_path)
    assert by_arm.returncode == 0, by_arm.stderr
    assert "23.25" in by_arm.stdout and "21.5" not in by_arm.stdout and " arm " in by_arm.stdout
    by_model = monolm("results", "--store", url, "--model", "monotonic", cwd=tmp_path)  # the deprecated alias
    assert by_model.returncode == 0 and by_model.stdout == by_arm.stdout
    help_text = monolm("results", "--help", cwd=tmp_path).stdout
    assert "--arm" in help_text and "--model" not in help_text


def test_config_folder_negative_seed_and_stages_without_no_prefect_are_refused(tmp_path):
    """Mistakes a new user makes on the command line: each is answered with one line naming the
    problem (exit 2, no traceback) before anything is written."""
    folder = monolm("config", "show", "--config", str(tmp_path), cwd=tmp_path)
    assert folder.returncode == 2 and "is a folder" in folder.stderr and "Traceback" not in folder.stderr
    seeds = monolm("run", "--no-prefect", "--seeds", "-1", cwd=tmp_path)
    assert seeds.returncode == 2 and "seeds.0" in seeds.stderr and "greater than or equal to 0" in seeds.stderr
    stages = monolm("run", "--stages", "4", cwd=tmp_path)
    assert stages.returncode == 2 and "--stages 4 needs --no-prefect" in stages.stderr
    assert "Traceback" not in seeds.stderr + stages.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/, no .state/ (the flow never started)


def fake_cached_hub_model(cache_dir: Path, name: str = "fake-org/neox") -> str:
    """A hub model's config.json in a Hugging Face cache, as a download leaves it (no weights)."""
    from transformers import GPTNeoXConfig

    snapshot = cache_dir / "hf" / f"models--{name.replace('/', '--')}" / "snapshots" / ("0" * 40)
    GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=2048,
    ).save_pretrained(snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    return name


def test_variant_is_checked_against_the_architecture_before_any_compute(tmp_path):
    """`gated_all` on a GPT-NeoX (non-gated MLPs): `verify` says so, and `run` refuses it before
    stage 0, for the tiny preset (architecture from the config) and for a hub model whose
    config.json is in the cache (offline)."""
    runs = f"paths.runs_root={tmp_path / 'runs'}"
    verify = monolm("verify", "--preset", "tiny", "--variant", "gated_all", "--set", runs, cwd=tmp_path)
    assert verify.returncode == 1
    assert "FAIL  constraint variant" in verify.stdout and "non-gated MLPs, use mlp_in" in verify.stdout
    run = monolm("run", "--preset", "tiny", "--variant", "gated_all", "--set", runs, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "constraint.variant='gated_all' does not fit model 'tiny-neox'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".state").exists()

    name = fake_cached_hub_model(tmp_path / "cache")
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    hub = ["--preset", "full", "--set", f"model.name={name}", "--set", f"paths.cache_dir={tmp_path / 'cache'}"]
    fits = monolm("verify", *hub, "--set", runs, cwd=tmp_path, env=offline)
    assert "PASS  model config loadable" in fits.stdout
    assert re.search(r"PASS  constraint variant +mlp_in: 2 Linear modules", fits.stdout), fits.stdout
    gated = monolm("verify", *hub, "--variant", "gated_all", "--set", runs, cwd=tmp_path, env=offline)
    assert "FAIL  constraint variant" in gated.stdout and "GPTNeoXForCausalLM" in gated.stdout
    run = monolm("run", "--no-prefect", *hub, "--variant", "gated_all", "--set", runs, cwd=tmp_path, env=offline)
    assert run.returncode == 2 and "does not fit model 'fake-org/neox'" in run.stderr
    assert not (tmp_path / "runs").exists()


def test_quiet_silences_every_progress_bar(tmp_path):
    """`-q`: not even transformers' own bars ("Loading weights", "Writing model shards"), which
    print without it."""
    from helpers import micro_sets

    def stages_0_1(root: Path, *flags: str) -> str:
        sets = [a for s in micro_sets(root) for a in ("--set", s)]
        out = monolm("run", *flags, "--no-prefect", "--stages", "1", *sets, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stderr

    bars = ("Loading weights", "Writing model shards", "it/s]")
    assert any(bar in stages_0_1(tmp_path / "loud") for bar in bars)  # the bars this test looks for
    quiet = stages_0_1(tmp_path / "quiet", "-q")
    assert not [bar for bar in bars if bar in quiet], quiet


def test_results_shows_run_ids_and_takes_names_prefixes_and_the_long_form(tmp_path):
    """Plain `monolm results` is one row per run, arm and headline metric with the run ID;
    `--compare` and `--run` take what that output shows (an ID, a name, a prefix); an unknown run
    gets the closest known ones, not a KeyError traceback; `--long` hides rows without a value."""
    from monolm.store import ResultsStore

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    with ResultsStore(url) as store:
        for run_id, ppl in (
            ("tiny-neox-mlp_in-fair-seeds-1-2-aaaa", 20.0),
            ("tiny-neox-mlp_both-fair-seeds-1-bbbb", 30.0),
        ):
            store.record_run(
                {"run_id": run_id, "run_name": run_id[:-5], "preset": "tiny"},
                [
                    *(
                        {"seed": seed, "arm": "baseline", "stage": "evaluate", "metric": "token_perplexity", "value": v}
                        for seed, v in ((1, ppl), (2, ppl + 2))
                    ),
                    {"seed": 1, "arm": "baseline", "stage": "evaluate", "metric": "docs", "value": 40},
                    {"arm": "baseline", "stage": "evaluate", "metric": "token_perplexity:std", "value": None},
                ],
            )
    plain = monolm("results", "--store", url, cwd=tmp_path, env={"COLUMNS": "200"})  # a wide terminal
    assert plain.returncode == 0, plain.stderr
    lines = [line for line in plain.stdout.splitlines() if "token_perplexity" in line]
    assert len(lines) == 2 and "tiny-neox-mlp_in-fair-seeds-1-2-aaaa" in lines[0] and "21" in lines[0]
    assert "docs" not in plain.stdout and "—" not in plain.stdout
    compare = monolm(
        "results", "--store", url, "--compare", "tiny-neox-mlp_in-fair-seeds-1-2", "tiny-neox-mlp_b", cwd=tmp_path
    )
    assert compare.returncode == 0, compare.stderr
    assert "A = tiny-neox-mlp_in-fair-seeds-1-2-aaaa" in compare.stdout and "9" in compare.stdout
    assert ":std" not in compare.stdout  # empty on both sides
    unknown = monolm("results", "--store", url, "--compare", "tiny-neox-mlp_in-fair-seeds-1", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "no run 'nope'" in unknown.stderr and "known runs" in unknown.stderr
    long = monolm("results", "--store", url, "--long", "--run", "tiny-neox-mlp_both", cwd=tmp_path)
    assert long.returncode == 0 and "docs" in long.stdout and "aaaa" not in long.stdout
    assert "(1 stored rows without a value not shown)" in long.stdout and ":std" not in long.stdout


def test_runs_rows_show_the_state_in_full_and_why_a_run_failed():
    """`monolm runs`: the state's whole name, the deployment (or `monolm run`), and a failed run's
    whole message, printed below the table (issue 24: it was cut at 80 characters, before the cause)."""
    import datetime as dt
    from types import SimpleNamespace

    from flows.runs import flow_run_rows, why_lines

    started = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC)

    def run(name, state, deployment=None, message=None, seconds=0.0):
        return SimpleNamespace(
            name=name,
            parameters={"preset": "tiny", "seeds": [42, 1337]},
            state=SimpleNamespace(message=message),
            state_name=state,
            deployment_id=deployment,
            start_time=started,
            expected_start_time=started,
            total_run_time=dt.timedelta(seconds=seconds),
        )

    rows = flow_run_rows(
        [
            run("a", "Crashed", "d1", "Flow run infrastructure exited with non-zero status code -9.\nmore", 3725),
            run("b", "Completed", None, "All states completed.", 83),
        ],
        {"d1": "experiment/seed-42"},
    )
    assert rows[0]["state"] == "Crashed" and rows[0]["deployment"] == "experiment/seed-42"
    assert rows[0]["message"] == "Flow run infrastructure exited with non-zero status code -9.\nmore"
    assert rows[0]["took"] == "1h02m"
    cause = "stage(s) failed: setup (42): ModelError: " + "x" * 200 + " the cause"
    failed = flow_run_rows([run("f", "Failed", None, cause)], {})
    assert why_lines(failed) == f"f (Failed):\n  {cause}\n"  # whole, below the table
    assert rows[1]["deployment"] == "(monolm run)" and rows[1]["message"] is None and rows[1]["took"] == "1m23s"
    assert rows[1]["seeds"] == "42 1337" and rows[1]["preset"] == "tiny" and rows[1]["grid"] is None
    # the experiment/variants deployment: the preset's seeds, every variant
    grid = run("c", "Completed", "d2")
    grid.parameters = {"preset": "tiny", "variants": ["all"], "models": ["tiny-neox", "tiny-neox-wide"]}
    (row,) = flow_run_rows([grid], {"d2": "experiment/variants"})
    assert row["seeds"] == "preset's" and row["grid"] == "models: tiny-neox tiny-neox-wide; variants: all"


def test_dry_run_names_the_results_folder_and_respects_stages(tmp_path):
    """Issue 24: `--dry-run` says which results folder the run writes and whether it exists, and
    `--no-prefect --stages 4` lists stages 0-4 only, without stage 7."""
    sets = ["--set", f"paths.runs_root={tmp_path / 'runs'}", "--set", f"paths.results_root={tmp_path / 'results'}"]
    from monolm.config import load_config
    from monolm.study.dry_run import results_folder

    folder = results_folder(load_config("tiny", sets=[s for s in sets if s != "--set"]))
    fresh = monolm("run", "--dry-run", *sets, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert f"results folder: {folder} (does not exist yet)" in fresh.stdout and "aggregate" in fresh.stdout
    folder.mkdir(parents=True)
    again = monolm("run", "--dry-run", *sets, cwd=tmp_path)
    assert f"results folder: {folder} (exists already" in again.stdout
    partial = monolm("run", "--no-prefect", "--stages", "4", "--dry-run", *sets, cwd=tmp_path)
    assert partial.returncode == 0, partial.stderr
    listed = [line.split()[0] for line in partial.stdout.splitlines()[2:] if line.strip()]
    assert "aggregate" not in listed and "uat" not in listed and "evaluate" in listed, partial.stdout
    assert "total: 6 stage executions" in partial.stdout and "results folder: none" in partial.stdout


def test_run_ends_with_the_one_sentence_answer(tmp_path, monkeypatch, capsys):
    """Issue 24: the last line of `monolm run` is the answer (from stage 7's result), and the hint
    names the run by its full ID (a name can be the prefix of another run's)."""
    import flows.cli as cli
    import flows.experiment as experiment

    answer = "The constraint cost +37% test perplexity (…); attack damage (constrained − baseline): UAT …."
    result = {"report": str(tmp_path / "report.md"), "run_id": "tiny-run-0123abcd", "run_name": "tiny-run"}
    result["dir"] = str(tmp_path / "results" / "tiny-run")
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg: {**result, "answer": answer})
    monkeypatch.setattr(cli, "print_constrain", lambda path: None)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    sets = ["--set", f"paths.runs_root={tmp_path / 'runs'}", "--set", f"paths.results_root={tmp_path / 'results'}"]
    assert cli.main(["run", "-q", *sets]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == answer
    assert any("`monolm results --run tiny-run-0123abcd`" in line for line in out)


@pytest.mark.slow
def test_a_permanent_error_inside_a_stage_is_not_retried_and_prints_no_traceback(tmp_path):
    """A corpus that passes the pre-run sample but is too small for stage 0 (a `DataError`, which
    no retry can fix): under Prefect the stage fails once (the preset retries twice otherwise),
    the console gets the cause in one line and no traceback, the exit status is 1."""
    import json
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 70), ("validation", 8), ("test", 8)):
        texts = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(n)]
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sets = [f"paths.runs_root={tmp_path / 'runs'}", f"paths.results_root={tmp_path / 'results'}"]
    sets += ["data.source=local", f"data.dataset={corpus}", "runner.retry_delay_seconds=30"]
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    out = monolm("run", "-q", *(a for s in sets for a in ("--set", s)), cwd=tmp_path, env=env, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "monolm: stage(s) failed: setup (42)" in out.stderr and "DataError: the attack part is empty" in text
    assert "Traceback" not in text and "Retry 1/" not in text, text[-3000:]
