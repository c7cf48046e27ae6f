"""Stage 7 — aggregate: read every seed's finished stages, compute the statistics, write
`results/<run-name>/` and record every number in the results store.

Trust: each input stage is accepted only through its manifest, and only if the manifest is the
very one the pipeline handed over (`monolm.report.seed_inputs`). A corrupt or changed input is
refused with its path, never silently summarised.

All or nothing: the results folder is built in a temporary sibling folder and renamed into place
only after every file is written; the store rows are then recorded in one transaction
(`ResultsStore.record_run`), and if that fails the new folder is taken away again and the
previous one restored. A failure at any point leaves neither a half results folder nor store rows,
and an earlier complete result of the same run (folder and rows) stays as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monolm import report
from monolm.config import ExperimentConfig, config_to_yaml
from monolm.core.artifacts import MANIFEST, atomic_write_json, atomic_write_text
from monolm.core.provenance import git_revision
from monolm.report import figures as plots
from monolm.report.answer import answer_sentence
from monolm.report.budget import plot_budget
from monolm.report.damage_arm import PAIR
from monolm.report.publish import earlier_runs, publish, published, safe_name  # noqa: F401  (published: re-exported)
from monolm.report.robust_section import DAMAGE_ARM, plot_robustness
from monolm.report.seed_inputs import read_seed
from monolm.study import registry
from monolm.study.frame import StageRef, stage_code_version

log = logging.getLogger("monolm.stages")

STAGE = "aggregate"


def reported_stages() -> tuple[str, ...]:
    """What a complete seed has: every stage but the baseline's shares (their results are in the
    cell's stages) and the quality controls (optional: `controls.*.enabled`)."""
    return tuple(s.name for s in registry.seed_stages() if s.share_of is None and s.kind != "control")


RESULT_FILES = ("results.json", "summary.csv", "report.md", "tables.tex", "config.yaml")


def run_id_for(cfg: ExperimentConfig, run_name: str) -> str:
    """Store key: the run name plus the config digest, so re-aggregating the same run replaces its
    rows (idempotent) while a differently configured run under the same name is kept apart."""
    return f"{run_name}-{cfg.digest()}"


# --------------------------------------------------------------------------- store rows
def cell_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The grid cell a cell configuration's store rows belong to."""
    return {"model": cfg.model.slug, "variant": cfg.constraint.variant, "init": cfg.constraint.init}


def store_rows(results: dict[str, Any], cell: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every number for the results store: per-seed values as they are, across-seed summaries as
    `<metric>:mean|std|ci_low|ci_high` (seed NULL), tests as `<metric>:diff|t_p|wilcoxon_p` under
    arm `monotonic-baseline` (seed NULL across seeds, the seed for a test over its examples); each
    row tagged with its grid `cell` (model, variant, init)."""
    rows = _value_rows(results) + _robustness_rows(results)
    return [{**row, **(cell or {})} for row in rows]


def _robustness_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Effective robustness (the "Robust or damaged?" section) per attack and arm, seed NULL:
    `effective_robustness:value|ci_low|ci_high|p`, the ladder's prediction and verdict in `extra`
    (the damage-matched arm under arm `damage-matched`, as in its paired tests' rows)."""
    section = results.get("robust_or_damaged") or {}
    rows = []
    for attack, rec in (section.get("attacks") or {}).items():
        for arm, r in rec["arms"].items():
            extra = {k: r[k] for k in ("clean_loss", "increase", "predicted", "in_range", "verdict") if k in r} | {
                "n_seeds": section.get("n_seeds"),
                "method": section.get("method"),
            }
            for stat, key in (("value", "effective"), ("ci_low", "ci_low"), ("ci_high", "ci_high"), ("p", "p_value")):
                rows.append(
                    {
                        "seed": None,
                        "arm": PAIR[1] if arm == DAMAGE_ARM else arm,
                        "stage": attack,
                        "metric": f"effective_robustness:{stat}",
                        "value": r[key],
                        "extra": extra,
                    }
                )
    return rows


def _value_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"seed": v["seed"], "arm": v["model"], "stage": v["stage"], "metric": v["metric"], "value": v["value"]}
        for v in results["values"]
    ]
    for s in results["summaries"]:
        extra = {"n": s["n"], "ci_method": s["ci_method"], "seeds": s["seeds"]}
        for stat in ("mean", "std", "ci_low", "ci_high"):
            rows.append(
                {
                    "seed": None,
                    "arm": s["model"],
                    "stage": s["stage"],
                    "metric": f"{s['metric']}:{stat}",
                    "value": s[stat],
                    "extra": extra,
                }
            )
    for c in results["comparisons"]:
        arm = f"{c['a']}-{c['b']}".replace(" ", "_")
        extra = {
            "n": c["n"],
            "scope": c["scope"],
            "significant": c["significant"],
            "ci": [c["ci_low"], c["ci_high"]],
            "test": c["test"],
        }
        for stat, key in (("diff", "mean_diff"), ("t_p", "t_p"), ("wilcoxon_p", "wilcoxon_p")):
            rows.append(
                {
                    "seed": c["seed"],
                    "arm": arm,
                    "stage": c["stage"],
                    "metric": f"{c['metric']}:{stat}",
                    "value": c[key],
                    "extra": extra,
                }
            )
    return rows


# --------------------------------------------------------------------------- writing
def _write_folder(
    directory: Path,
    cfg: ExperimentConfig,
    results: dict[str, Any],
    histories: dict[int, dict[str, Any]],
    config_path: Path,
) -> list[str]:
    """Write every result file into `directory` (a temp folder); return their relative paths."""
    written = [
        ("config.yaml", atomic_write_text(directory / "config.yaml", config_to_yaml(cfg))),
        ("results.json", atomic_write_json(directory / "results.json", results)),
        ("summary.csv", atomic_write_text(directory / "summary.csv", report.summary_csv(results))),
        ("tables.tex", atomic_write_text(directory / "tables.tex", report.latex(results))),
    ]
    figures = {**plots.render_all(results, histories, directory), **plot_budget(results, directory)}
    robustness = plot_robustness(results.get("robust_or_damaged"), directory / "robustness.png")
    if robustness is not None:
        figures["robustness"] = robustness
    rel_plots = {name: path.name for name, path in figures.items()}
    # The file next to report.md, by name: the report is read on other machines (no absolute path of this one).
    md = report.markdown(results, plots=rel_plots, config_yaml=config_to_yaml(cfg), config_path=config_path.name)
    written.append(("report.md", atomic_write_text(directory / "report.md", md)))
    return [rel for rel, _ in written] + sorted(rel_plots.values())


def run(cfg: ExperimentConfig, seeds: Sequence[Mapping[str, StageRef | Mapping[str, Any]]]) -> dict[str, Any]:
    """Aggregate all seeds of a run. `seeds` holds one {stage name: StageRef} per seed.

    Returns {"stage", "run_name", "run_id", "dir", "report", "files" (absolute paths), "table"
    (console rows, one per model), "answer" (the one-sentence answer), "digest" (sha256 of
    results.json), "metrics" (headline numbers),
    "status"}.
    """
    started = time.time()
    if not seeds:
        raise ValueError("aggregate needs at least one seed's stage results")
    data = [read_seed(refs) for refs in seeds]
    seed_ids = [d["seed"] for d in data]
    if len(set(seed_ids)) != len(seed_ids):
        raise ValueError(f"seed(s) passed more than once: {sorted(s for s in set(seed_ids) if seed_ids.count(s) > 1)}")
    run_name, final = results_folder(cfg)
    meta = run_meta(cfg, data, run_name, final)
    results = report.analyze(data, meta)
    outcome = _publish(cfg, data, results, meta, final, started)
    shown = {
        "table": report.console_rows(results),
        "answer": answer_sentence(results),
        "metrics": report.headline(results),
    }
    return finish(cfg, meta, final, outcome, f"{len(data)} seed(s)", shown)


def results_folder(cfg: ExperimentConfig) -> tuple[str, Path]:
    """The run's name (a plain folder name, checked) and the results folder it names."""
    run_name = safe_name(cfg.run_name or cfg.default_run_name)
    return run_name, Path(cfg.paths.results_root).resolve() / run_name


def finish(
    cfg: ExperimentConfig,
    meta: dict[str, Any],
    final: Path,
    outcome: tuple[list[str], str, int],
    what: str,
    shown: dict[str, Any],
) -> dict[str, Any]:
    """Say where the published results went (`what`: how much they summarise) and return what
    stage 7 returns, for one cell or a grid: the run, its files (`outcome`: `publish`'s relative
    names under `final`, then the manifest), the earlier runs kept beside it, the console `table`, the `answer`,
    the digest and the headline `metrics` (those three from `shown`)."""
    rel_files, digest, n_rows = outcome
    earlier = log_written(cfg, final, what, n_rows)
    return {
        "earlier": earlier,
        "stage": STAGE,
        "run_name": meta["run_name"],
        "run_id": meta["run_id"],
        "status": meta["status"],
        "dir": str(final),
        "report": str(final / "report.md"),
        "files": [str(final / rel) for rel in [*rel_files, MANIFEST]],
        "table": shown["table"],
        "answer": shown["answer"],
        "digest": digest,
        "metrics": shown["metrics"],
    }


def log_written(cfg: ExperimentConfig, final: Path, what: str, n_rows: int) -> list[str]:
    """Say where the results went and which earlier runs of the same study are kept beside them;
    returns those runs' folder names."""
    earlier = earlier_runs(cfg, final)
    log.info("aggregate: %s -> results folder %s (%d store rows)", what, final, n_rows)
    if earlier:
        log.info("aggregate: earlier runs of this study, kept: %s", ", ".join(earlier))
    return earlier


def _gaps(cfg: ExperimentConfig, data: list[dict[str, Any]]) -> list[str]:
    """What keeps the run from being complete: seeds lacking stages, configured seeds not given."""
    gaps = [
        f"seed {d['seed']} lacks {', '.join(s for s in reported_stages() if s not in d['stages'])}"
        for d in sorted(data, key=lambda d: d["seed"])
        if not set(reported_stages()) <= set(d["stages"])
    ]
    absent = sorted(set(cfg.seeds) - {d["seed"] for d in data})
    if absent:
        gaps.append(f"configured seed(s) {', '.join(map(str, absent))} not aggregated")
    return gaps


def run_meta(cfg: ExperimentConfig, data: list[dict[str, Any]], run_name: str, final: Path) -> dict[str, Any]:
    """What the report says about the run as a whole: names, recipe, code and config versions,
    seeds, completeness and the exact stage folders it summarises."""
    gaps = _gaps(cfg, data)
    revisions = sorted({st["git_revision"] for d in data for st in d["stages"].values() if st["git_revision"]})
    return {
        "run_name": run_name,
        "run_id": run_id_for(cfg, run_name),
        "preset": cfg.preset,
        "model": cfg.model.name,
        "model_slug": cfg.model.slug,
        "variant": cfg.constraint.variant,
        "init": cfg.constraint.init,
        "recipe": cfg.training.recipe,
        "arms": {arm: cfg.training.arm(arm).model_dump(mode="json") for arm in report.ARMS},
        "success_threshold": cfg.attacks.success_threshold,
        "config_digest": cfg.digest(),
        "code_revision": git_revision(),
        "aggregate_code_version": stage_code_version(STAGE),
        "stage_revisions": revisions,
        "seeds": sorted(d["seed"] for d in data),
        "configured_seeds": list(cfg.seeds),
        "status": "partial" if gaps else "completed",
        "incomplete": "; ".join(gaps) or None,
        "config_path": str(final / "config.yaml"),
        "inputs": {
            str(d["seed"]): {
                name: {"dir": st["dir"], "digest": st["digest"], "code_version": st["code_version"]}
                for name, st in d["stages"].items()
            }
            for d in sorted(data, key=lambda d: d["seed"])
        },
    }


def run_row_of(cfg: ExperimentConfig, meta: dict[str, Any], *, model: str, variant: str) -> dict[str, Any]:
    """The results store's row of a run (`model`/`variant`: the run's, `+`-joined for a grid)."""
    return {
        "run_id": meta["run_id"],
        "run_name": meta["run_name"],
        "preset": cfg.preset,
        "model": model,
        "variant": variant,
        "recipe": cfg.training.recipe,
        "config_digest": meta["config_digest"],
        "code_revision": meta["code_revision"],
        "seeds": meta["seeds"],
        "status": meta["status"],
    }


def _publish(
    cfg: ExperimentConfig,
    data: list[dict[str, Any]],
    results: dict[str, Any],
    meta: dict[str, Any],
    final: Path,
    started: float,
) -> tuple[list[str], str, int]:
    """One cell's results folder and store rows (`publish`)."""
    histories = {d["seed"]: d["histories"] for d in data}
    return publish(
        cfg,
        final,
        started,
        write_files=lambda tmp: _write_folder(tmp, cfg, results, histories, final / "config.yaml"),
        inputs={f"seed-{d['seed']}/{name}": st["digest"] for d in data for name, st in d["stages"].items()},
        metrics=report.headline(results),
        run=run_row_of(cfg, meta, model=cfg.model.name, variant=cfg.constraint.variant),
        rows=store_rows(results, cell_tags(cfg)),
        digest_of="results.json",
    )
