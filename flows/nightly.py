"""The nightly regression check: compare tonight's key metrics with the previous nightly run.

The nightly deployment (`experiment/nightly-quick`) runs the `experiment` flow with
`nightly=True`; after stage 7 has recorded the run in the results store, `regression_check`
reads this run's and the previous nightly run's across-seed means from the store and compares
them metric by metric:

* held-out token perplexity, per model (base, baseline, monotonic);
* the attacks' absolute loss increase (nats/token), per attack and arm.

Why two-sided: the nightly run repeats the same configuration, so any move beyond noise means
the code changed behaviour. A model that got worse is a regression, and so is an attack that got
weaker (its loss increase dropped), which would make every model look more robust.

"Previous" is the latest earlier nightly run of the same preset, variant and model whose status
is `completed`. A run that fails the check is re-marked `failed` in the store, so a regression
stays flagged every night until it is fixed (or accepted with `python -m flows.nightly accept
<run_id>`), instead of becoming the next night's baseline. The first nightly run has nothing to
compare with and passes, saying so.

The result is published as a markdown artifact (key `nightly-regression-<preset>`, one version
per night in the UI) and a regression fails the flow run with the list of moved metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from monolm.store import METRIC_FIELDS, ResultsStore
from monolm.study.registry import ATTACKS
from monolm.study.site_preflight import SiteCheckError
from tasks.aggregate import artifact_key

RUN_NAME_PREFIX = "nightly-"


def compared_metrics() -> tuple[tuple[str, str], ...]:
    """(stage, metric) pairs compared, every attack of the registry's; every model/arm the store
    holds for them is compared."""
    return (("evaluate", "token_perplexity"), *((attack, "abs_increase") for attack in ATTACKS))


SUMMARY = ":mean"  # the across-seed mean stage 7 records (seed NULL)


class RegressionError(RuntimeError):
    """A nightly run whose key metrics moved beyond their tolerance (the message lists them)."""


@dataclass(frozen=True)
class Tolerance:
    """A move is tolerated while |now - before| <= max(abs, rel * |before|)."""

    rel: float
    abs: float = 0.0

    def allowed(self, previous: float) -> float:
        return max(self.abs, self.rel * abs(previous))


# Perplexity: 5 % relative. Attack loss increase: 25 % relative but at least 0.02 nats/token
# (small effects are noisy in relative terms; the quick preset attacks 40 texts).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "token_perplexity": Tolerance(rel=0.05),
    "abs_increase": Tolerance(rel=0.25, abs=0.02),
}


def parse_tolerances(spec: Mapping[str, Any] | None) -> dict[str, Tolerance]:
    """The defaults updated by `spec`: {metric: rel} or {metric: {"rel": r, "abs": a}}."""
    out = dict(DEFAULT_TOLERANCES)
    for metric, value in (spec or {}).items():
        if metric not in DEFAULT_TOLERANCES:
            raise ValueError(f"regression_tolerance: unknown metric {metric!r}; known: {', '.join(DEFAULT_TOLERANCES)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tol = Tolerance(rel=float(value), abs=out[metric].abs)
        elif isinstance(value, Mapping) and set(value) <= {"rel", "abs"}:
            tol = Tolerance(rel=float(value.get("rel", out[metric].rel)), abs=float(value.get("abs", out[metric].abs)))
        else:
            raise ValueError(
                f"regression_tolerance[{metric!r}] must be a number (relative) or {{'rel': r, 'abs': a}}, got {value!r}"
            )
        if tol.rel < 0 or tol.abs < 0 or not (math.isfinite(tol.rel) and math.isfinite(tol.abs)):
            raise ValueError(f"regression_tolerance[{metric!r}] must be finite and >= 0, got {value!r}")
        out[metric] = tol
    return out


def nightly_run_name(preset: str, when: dt.datetime | None = None) -> str:
    """`nightly-<preset>-<UTC time>`: one name per scheduled slot, so a retried nightly run keeps
    its name (and replaces its own store rows) while each night gets a new one."""
    when = when or dt.datetime.now(dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return f"{RUN_NAME_PREFIX}{preset}-{when.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}"


# --------------------------------------------------------------------------- comparison
MetricKey = tuple[str, str, str]  # (stage, model, metric)


def key_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[MetricKey, float | None]:
    """The compared numbers among a run's store rows: across-seed means of the key metrics.
    None marks a value the store holds as not finite (a diverged run)."""
    wanted = {(stage, metric + SUMMARY) for stage, metric in compared_metrics()}
    out: dict[MetricKey, float | None] = {}
    for row in rows:
        if row.get("seed") is None and (row.get("stage"), row.get("metric")) in wanted and row.get("arm"):
            out[(row["stage"], row["arm"], row["metric"][: -len(SUMMARY)])] = row.get("value")
    return out


@dataclass(frozen=True)
class Finding:
    stage: str
    model: str
    metric: str
    previous: float | None
    current: float | None
    allowed: float | None
    status: str  # ok | beyond tolerance | missing now | not finite | new

    @property
    def regression(self) -> bool:
        return self.status in ("beyond tolerance", "missing now", "not finite")

    @property
    def change(self) -> float | None:
        if self.previous is None or self.current is None:
            return None
        return self.current - self.previous

    def describe(self) -> str:
        where = f"{self.stage} {self.metric} ({self.model})"
        if self.status == "beyond tolerance":
            rel = f", {self.change / abs(self.previous):+.1%}" if self.previous else ""
            return (
                f"{where}: {_num(self.previous)} -> {_num(self.current)} (change {self.change:+.4g}{rel}; "
                f"tolerance ±{_num(self.allowed)})"
            )
        if self.status == "missing now":
            return f"{where}: {_num(self.previous)} before, not measured now"
        if self.status == "not finite":
            return f"{where}: {_num(self.previous)} before, not finite now"
        return f"{where}: {_num(self.previous)} -> {_num(self.current)}"


def compare(
    current: Mapping[MetricKey, float | None],
    previous: Mapping[MetricKey, float | None],
    tolerances: Mapping[str, Tolerance] | None = None,
) -> list[Finding]:
    """One finding per key metric in either run, sorted by stage, metric, model."""
    tolerances = tolerances or DEFAULT_TOLERANCES
    findings = []
    for key in sorted(set(current) | set(previous)):
        stage, model, metric = key
        now, before = current.get(key), previous.get(key)
        allowed = tolerances[metric].allowed(before) if before is not None else None
        if key not in previous or before is None:
            status = "new"  # nothing (finite) to compare with: reported, not a regression
        elif key not in current:
            status = "missing now"
        elif now is None or not math.isfinite(now):
            status = "not finite"
        elif abs(now - before) > allowed:
            status = "beyond tolerance"
        else:
            status = "ok"
        findings.append(Finding(stage, model, metric, before, now, allowed, status))
    return findings


@dataclass
class RegressionResult:
    run: dict[str, Any]
    previous: dict[str, Any] | None
    findings: list[Finding]
    tolerances: dict[str, Tolerance]

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regression]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def message(self) -> str:
        if self.previous is None:
            return (
                f"no regression: {self.run['run_name']} is the first nightly run of preset "
                f"{self.run['preset']}, nothing to compare with"
            )
        if self.passed:
            return (
                f"no regression: {len(self.findings)} key metrics of {self.run['run_name']} are within "
                f"tolerance of {self.previous['run_name']}"
            )
        lines = [
            f"regression: {len(self.regressions)} of {len(self.findings)} key metrics of "
            f"{self.run['run_name']} moved beyond tolerance since {self.previous['run_name']}:"
        ]
        lines += [f"- {f.describe()}" for f in self.regressions]
        return "\n".join(lines)

    def markdown(self) -> str:
        run, prev = self.run, self.previous
        out = [f"# Nightly regression check: {run['run_name']}", ""]
        if prev is None:
            out += [
                f"**No regression**: this is the first nightly run of preset `{run['preset']}` "
                f"(model `{run.get('model')}`, variant `{run.get('variant')}`), so there is nothing to compare "
                "with. Tomorrow's run is compared with this one.",
                "",
            ]
        elif self.passed:
            out += [
                f"**No regression**: all {len(self.findings)} key metrics are within tolerance of the previous "
                f"nightly run `{prev['run_name']}`.",
                "",
            ]
        else:
            out += [
                f"**Regression**: {len(self.regressions)} of {len(self.findings)} key metrics moved beyond "
                f"tolerance since the previous nightly run `{prev['run_name']}`:",
                "",
            ]
            out += [f"- {f.describe()}" for f in self.regressions] + [""]
        out += [f"- this run: `{run['run_id']}` ({run.get('created_at')}, code {run.get('code_revision') or '?'})"]
        if prev is not None:
            out += [
                f"- compared with: `{prev['run_id']}` ({prev.get('created_at')}, code "
                f"{prev.get('code_revision') or '?'})"
            ]
        tol = "; ".join(f"{m}: ±max({t.abs:g}, {t.rel:.0%} of previous)" for m, t in self.tolerances.items())
        out += [f"- tolerances (two-sided): {tol}", ""]
        if self.findings:
            out += [
                "| stage | model | metric | previous | now | change | tolerance | verdict |",
                "|---|---|---|---:|---:|---:|---:|---|",
            ]
            for f in self.findings:
                change = "—" if f.change is None else f"{f.change:+.4g}"
                out.append(
                    f"| {f.stage} | {f.model} | {f.metric} | {_num(f.previous)} | {_num(f.current)} | {change} "
                    f"| ±{_num(f.allowed)} | {f.status} |"
                )
        return "\n".join(out) + "\n"

    def summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "run_id": self.run["run_id"],
            "previous_run_id": self.previous["run_id"] if self.previous else None,
            "message": self.message(),
            "findings": [{**asdict(f), "regression": f.regression} for f in self.findings],
        }


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"


def previous_nightly(store: ResultsStore, run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latest `completed` nightly run created before `run`, with the same preset, variant
    and model (comparing different models' perplexities would say nothing)."""
    candidates = store.runs(
        run["preset"],
        status="completed",
        variant=run.get("variant"),
        model=run.get("model"),
        run_name_prefix=RUN_NAME_PREFIX,
    )
    pivot = (dt.datetime.fromisoformat(run["created_at"]), run["run_id"])
    earlier = [r for r in candidates if (dt.datetime.fromisoformat(r["created_at"]), r["run_id"]) < pivot]
    return earlier[-1] if earlier else None


def check_store(store: ResultsStore, run_id: str, tolerance: Mapping[str, Any] | None = None) -> RegressionResult:
    """Compare stored run `run_id` with the previous nightly run (no side effects)."""
    tolerances = parse_tolerances(tolerance)
    run = store.get_run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in results store {store.url}")
    previous = previous_nightly(store, run)
    if previous is None:
        return RegressionResult(run, None, [], tolerances)
    findings = compare(
        key_metrics(store.query(run_id=run_id)), key_metrics(store.query(run_id=previous["run_id"])), tolerances
    )
    return RegressionResult(run, previous, findings, tolerances)


def set_status(store: ResultsStore, run_id: str, status: str) -> None:
    """Re-record a run with another status, keeping its metrics and creation time (the store
    replaces a run by id in one transaction)."""
    run = store.get_run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in results store {store.url}")
    rows = [{k: row[k] for k in METRIC_FIELDS} for row in store.query(run_id=run_id)]
    store.record_run({**run, "status": status}, rows)


# --------------------------------------------------------------------------- Prefect task
@task(name="regression-check", task_run_name="regression-check", cache_policy=NO_CACHE, retries=0)
def regression_check(store_url: str, run_id: str, tolerance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare, publish the markdown artifact, and fail (RegressionError) on a regression; a
    regressed run is marked `failed` in the store so that it never becomes a baseline."""
    with ResultsStore(store_url) as store:
        result = check_store(store, run_id, tolerance)
        create_markdown_artifact(
            markdown=result.markdown(),
            key=artifact_key("nightly-regression", result.run["preset"]),
            description=result.message().splitlines()[0],
        )
        if not result.passed:
            set_status(store, run_id, "failed")
            raise RegressionError(result.message())
    return result.summary()


# --------------------------------------------------------------------------- before the run
@task(name="verify", task_run_name="verify-{cfg_data[preset]}", cache_policy=NO_CACHE, retries=0)
def verify_site(cfg_data: dict[str, Any], timeout: float = 30.0) -> list[dict[str, Any]]:
    """`monolm verify` at the start of every run, for each model whose stage 0 still has to run:
    every check as a log line; a failed check fails the run at once (`SiteCheckError`, never
    retried) with every reason and next step in its message (an unreachable hub fails within
    `timeout` seconds instead of deep in stage 0, after the workers started)."""
    from prefect import get_run_logger

    from monolm.config import build_config
    from monolm.study.site_checks import run_checks
    from monolm.study.site_preflight import blocking, failure_message, models_to_set_up

    log = get_run_logger()
    made = []
    for model_cfg in models_to_set_up(build_config(cfg_data)):
        checks = run_checks(model_cfg, timeout=timeout)
        for check in checks:
            (log.error if check.ok is False else log.info)("%s  %s: %s", check.status, check.name, check.detail)
        made += [asdict(c) for c in checks]
        if blocking(checks):
            raise SiteCheckError(failure_message(model_cfg, checks))
    return made


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.nightly check|accept RUN_ID --store URL`: re-check a stored run, or accept
    a run that failed the check (an intended change) as the new baseline."""
    parser = argparse.ArgumentParser(prog="python -m flows.nightly", description=main.__doc__)
    parser.add_argument("command", choices=("check", "accept"))
    parser.add_argument("run_id")
    parser.add_argument(
        "--store",
        required=True,
        help="results store URL (paths.store_url; default sqlite:///<runs_root>/results.sqlite)",
    )
    args = parser.parse_args(argv)
    with ResultsStore(args.store) as store:
        if args.command == "accept":
            set_status(store, args.run_id, "completed")
            print(f"{args.run_id} is completed again: the next nightly run is compared with it")
            return 0
        result = check_store(store, args.run_id)
        print(result.message())
        return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
