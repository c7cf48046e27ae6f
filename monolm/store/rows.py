"""What callers record, turned into validated table rows, and stored rows turned back into dicts.

Unknown fields, a missing run_id, an unknown status or a value that is not a number are refused
by name before anything is written.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from monolm.core.artifacts import json_default
from monolm.store.schema import runs_table

RUN_STATUSES = ("running", "completed", "failed", "partial")
ARMS = ("base", "baseline", "monotonic", "monotonic-baseline")  # values of `arm`, never of `model`
RUN_FIELDS = tuple(c.name for c in runs_table.columns)
METRIC_FIELDS = ("seed", "arm", "model", "variant", "init", "preset", "recipe", "stage", "metric", "value", "extra")
INHERITED = ("model", "variant", "preset", "recipe")  # metric rows default to their run's values


def utc_naive(value: Any) -> dt.datetime:
    """Timestamps are stored as naive UTC: SQLite has no time zones, and one convention on all
    backends keeps ordering comparisons correct."""
    if value is None:
        value = dt.datetime.now(dt.UTC)
    elif isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        raise ValueError(f"created_at must be a datetime or ISO string, got {value!r}")
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat()


def _json_safe(value: Any, what: str) -> Any:
    """JSON columns must hold strict JSON (PostgreSQL rejects NaN/Infinity)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, default=json_default))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serializable ({exc}): {value!r}") from None


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    unknown = set(run) - set(RUN_FIELDS)
    if unknown:
        raise ValueError(f"record_run: unknown run field(s) {sorted(unknown)}; allowed: {', '.join(RUN_FIELDS)}")
    run_id = run.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"record_run: run_id must be a non-empty string, got {run_id!r}")
    status = run.get("status", "completed")
    if status not in RUN_STATUSES:
        raise ValueError(f"record_run: status={status!r} is not one of {', '.join(RUN_STATUSES)}")
    row = {field: run.get(field) for field in RUN_FIELDS}
    row.update(
        created_at=utc_naive(run.get("created_at")),
        status=status,
        seeds=_json_safe(list(run["seeds"]), "seeds") if run.get("seeds") is not None else None,
    )
    return row


def metric_row(run: dict[str, Any], metric: dict[str, Any], index: int) -> dict[str, Any]:
    """One validated `metrics` row. Non-finite values are stored as NULL and the original kept
    in `extra["nonfinite"]`, so a diverged run is recorded (and visible) rather than lost."""
    where = f"metrics[{index}]"
    unknown = set(metric) - set(METRIC_FIELDS)
    if unknown:
        raise ValueError(
            f"record_run: {where} has unknown field(s) {sorted(unknown)}; allowed: {', '.join(METRIC_FIELDS)}"
        )
    if metric.get("model") in ARMS:  # a caller of schema version 1, where `model` held the arm
        raise ValueError(
            f"record_run: {where} has model={metric['model']!r}, an arm: the arm's field is 'arm' "
            "('model' names the grid cell's model)"
        )
    name = metric.get("metric")
    if not isinstance(name, str) or not name:
        raise ValueError(f"record_run: {where} needs a non-empty 'metric' name, got {name!r}")
    if "value" not in metric:
        raise ValueError(f"record_run: {where} ({name}) has no 'value'")
    extra = dict(metric.get("extra") or {})
    raw = metric["value"]
    if raw is None:
        value = None
    else:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"record_run: {where} ({name}) value {raw!r} is not a number") from None
        if not math.isfinite(value):
            extra["nonfinite"] = repr(value)
            value = None
    seed = metric.get("seed")
    row = {
        "run_id": run["run_id"],
        "seed": int(seed) if seed is not None else None,
        "arm": metric.get("arm"),
        "init": metric.get("init"),
        "stage": metric.get("stage"),
        "metric": name,
        "value": value,
        "extra": _json_safe(extra, f"{where} ({name}) extra") if extra else None,
    }
    for field in INHERITED:
        row[field] = metric.get(field, run.get(field))
    return row


def run_dict(row: Any) -> dict[str, Any]:
    """A stored `runs` row as a dict, its creation time as an ISO string in UTC."""
    out = dict(row)
    out["created_at"] = iso(out["created_at"])
    return out
