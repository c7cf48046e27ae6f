"""A stage's progress in the Prefect UI: the library's progress events (`monolm.core.progress`) turned
into a progress artifact per long stage, and, while an arm trains, a table artifact of its
training curve that grows at every evaluation.

The library reports through the stage's `on_log` callback and never imports Prefect; this module
is that callback. Artifact updates are API calls, so they are throttled (`min_interval_s`), except
for what a user waits for: the first event, each evaluation, and the end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from monolm.core.progress import format_eta
from monolm.study.registry import stage as stage_spec
from tasks.common import artifact_key

log = logging.getLogger("tasks.progress")

# Stages long enough to deserve a progress bar in the UI (training, evaluation, attacks).
PROGRESS_KINDS = frozenset({"train", "evaluate", "attack", "control"})
MIN_INTERVAL_S = 5.0
CURVE_COLUMNS = ("step", "train_loss", "val_loss", "val_perplexity", "lr", "tokens_per_s")


def tracks_progress(stage: str) -> bool:
    return stage_spec(stage).kind in PROGRESS_KINDS


class StageProgress:
    """The `on_log` callback of one stage task: a progress artifact (percent done, the latest
    progress line and the time left as its description) and, for training, the curve table."""

    def __init__(
        self,
        stage: str,
        seed: int | None,
        run_name: str,
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from prefect.artifacts import create_progress_artifact

        self.stage, self.seed, self.run_name = stage, seed, run_name
        self.min_interval_s, self.clock = min_interval_s, clock
        self.started = clock()
        self.fraction = 0.0
        self.message = "starting"
        self.last_sent = -float("inf")
        self.sent_fraction: float | None = None
        self.train: dict[str, Any] | None = None  # the latest training log entry
        self.curve: list[dict[str, Any]] = []
        self.curve_id: Any = None
        self.artifact_id = create_progress_artifact(progress=0.0, description=self._description())
        self.updates = 1

    @property
    def title(self) -> str:
        return f"{self.stage}" + (f" seed {self.seed}" if self.seed is not None else "")

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "train":
            self.train = event
        if kind == "eval":
            self._add_curve_point(event)
        if event.get("fraction") is not None:
            self.fraction = min(max(float(event["fraction"]), self.fraction), 1.0)
        if event.get("message"):
            self.message = f"{event['part']}: {event['message']}" if event.get("part") else str(event["message"])
        self.update(force=kind == "eval")

    def update(self, force: bool = False) -> None:
        """Send the current percentage and description, unless one was sent moments ago."""
        now = self.clock()
        if self.sent_fraction == self.fraction and not force:
            return
        if not force and now - self.last_sent < self.min_interval_s and self.fraction < 1.0:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(
                artifact_id=self.artifact_id, progress=round(100 * self.fraction, 1), description=self._description()
            )
        except Exception as exc:  # the UI's progress is never worth failing a stage for
            log.debug("progress artifact update failed: %s", exc)
            return
        self.last_sent, self.sent_fraction = now, self.fraction
        self.updates += 1

    def finish(self) -> None:
        """The stage completed: show 100%."""
        self.fraction = 1.0
        self.message = f"done in {format_eta(self.clock() - self.started)}"
        self.update(force=True)

    def _description(self) -> str:
        elapsed = self.clock() - self.started
        if self.fraction >= 1:
            status = "100%"
        else:  # the stage's own pace so far (model loading included)
            eta = elapsed * (1 - self.fraction) / self.fraction if self.fraction > 0 else None
            status = f"{100 * self.fraction:.0f}%, ETA {format_eta(eta)}"
        lines = [f"**{self.title}**: {status}"]
        lines.append(self.message)
        if self.curve:
            last = self.curve[-1]
            best = min(self.curve, key=lambda p: p["val_perplexity"])
            lines.append(
                f"val perplexity {last['val_perplexity']:.3f} at step {last['step']} "
                f"(best {best['val_perplexity']:.3f} at step {best['step']}; curve: artifact `{self.curve_key}`)"
            )
        return "\n\n".join(lines)

    # -- the training curve
    @property
    def curve_key(self) -> str:
        seed = f"-seed-{self.seed}" if self.seed is not None else ""
        return artifact_key("curve", f"{self.run_name}{seed}-{self.stage}")

    def _add_curve_point(self, event: dict[str, Any]) -> None:
        """One row per evaluation (with the latest training loss and rate): the curve table is
        created at the first evaluation and updated in place after (one artifact per arm, not a
        version per evaluation)."""
        train = self.train if event["step"] > 0 and self.train else {}  # step 0: the starting model, untrained
        point = {
            "step": event["step"],
            "train_loss": train.get("train_loss"),
            "val_loss": event.get("val_loss"),
            "val_perplexity": event.get("val_perplexity"),
            "lr": train.get("lr"),
            "tokens_per_s": train.get("tokens_per_s"),
        }
        self.curve.append(point)
        rows = [{col: _rounded(col, p.get(col)) for col in CURVE_COLUMNS} for p in self.curve]
        try:
            if self.curve_id is None:
                from prefect.artifacts import create_table_artifact

                self.curve_id = create_table_artifact(
                    table=rows,
                    key=self.curve_key,
                    description=f"{self.title}: training curve of {self.run_name}, one row per evaluation",
                )
            else:
                update_table_artifact(self.curve_id, rows)
        except Exception as exc:
            log.debug("curve artifact failed: %s", exc)


def update_table_artifact(artifact_id: Any, rows: list[dict[str, Any]]) -> None:
    """Replace a table artifact's rows (Prefect stores a table as its JSON text)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    with get_client(sync_client=True) as client:
        client.update_artifact(artifact_id=artifact_id, artifact=ArtifactUpdate(data=json.dumps(rows)))


# Digits a reader of the curve can use: losses to 4 decimals, perplexity to 2, the learning rate to
# 3 significant digits, throughput in whole tokens per second.
_DECIMALS = {"train_loss": 4, "val_loss": 4, "val_perplexity": 2, "tokens_per_s": 0}


def _rounded(column: str, value: Any) -> Any:
    """`value` at the precision of its `column`; None for a value JSON cannot hold (NaN, inf)."""
    if not isinstance(value, float):
        return value
    if not math.isfinite(value):
        return None
    if column == "lr":
        return float(f"{value:.3g}")
    digits = _DECIMALS.get(column, 5)
    return round(value) if digits == 0 else round(value, digits)


def compose(*hooks: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
    """One `on_log` that calls each hook in turn (None hooks are skipped)."""
    active = [h for h in hooks if h is not None]

    def on_log(event: dict[str, Any]) -> None:
        for hook in active:
            hook(event)

    return on_log
