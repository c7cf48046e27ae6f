"""The site checks of `monolm verify`, made before any stage of `monolm run` and of every
deployment run: a model that is neither reachable nor cached, unreadable data or a full disk stop
the run in seconds with the cause and what to do, instead of failing stage 0 after the workers
started (and, without `PermanentError`, after every retry).

Only models whose stage 0 still has to run are checked: a model whose setup stage is finished
for every seed needs neither the hub nor the data again, so a fully cached study runs offline."""

from __future__ import annotations

from monolm.config import ExperimentConfig
from monolm.core.errors import PermanentError
from monolm.study.cells import cells
from monolm.study.dry_run import plan_study
from monolm.study.site_checks import Check, run_checks

# A failed hub probe alone does not stop a run: a cached model and local data need no hub (the
# model and data checks then say whether they are there).
NOT_BLOCKING = {"hub reachable"}


class SiteCheckError(PermanentError, RuntimeError):
    """Stage 0 could not run here: the model, the data or the disk that `monolm verify` checks."""


def models_to_set_up(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One config per model of the study whose stage 0 is not finished for every seed."""
    pending = {e.where.removesuffix("/shared") for e in plan_study(cfg, last=0) if not e.done}
    out: dict[str, ExperimentConfig] = {}
    for cell in cells(cfg):
        if cell.model in pending and cell.model not in out:
            out[cell.model] = cell.cfg
    return list(out.values())


def blocking(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.ok is False and c.name not in NOT_BLOCKING]


def failure_message(cfg: ExperimentConfig, checks: list[Check]) -> str:
    """The cause in full: every failed check with its reason and its next step, one per line."""
    failed = blocking(checks)
    lines = [
        f"stopped before stage 0, nothing was run: {len(failed)} check(s) of `monolm verify --preset {cfg.preset}` "
        f"failed for model {cfg.model.name} and data {cfg.data.dataset}:"
    ]
    said = set()
    for check in failed:
        lines.append(f"FAIL {check.name}: {check.detail}")
        if check.next_step and check.next_step not in said:  # model and tokenizer share theirs
            lines.append(f"  next: {check.next_step}")
            said.add(check.next_step)
    return "\n".join(lines)


def site_preflight(cfg: ExperimentConfig, timeout: float = 30.0) -> list[Check]:
    """Run the site checks for every model that still needs stage 0; raise `SiteCheckError`
    (never retried) naming every blocking failure. Returns the checks made (none when every
    model's stage 0 is finished)."""
    made: list[Check] = []
    for model_cfg in models_to_set_up(cfg):
        checks = run_checks(model_cfg, timeout=timeout)
        made += checks
        if blocking(checks):
            raise SiteCheckError(failure_message(model_cfg, checks))
    return made
