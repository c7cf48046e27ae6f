"""The GCG stages: `gcg_baseline` (the baseline's share, once per model and seed) and `gcg` (per
cell: the constrained arm, the transfer between the arms, and what stage 7 reads).

Each arm is attacked twice, by GCG and by its gradient-free control at the same budget
(`attacks.gcg.random_control`). Files, as UAT's (`monolm.attacks.stage`): `gcg_results.json`
{arm: {"gcg": results, "control": results}}; a cell's stage adds `triggers.json`,
`transfer.json`, `curves.json` {arm: {"gcg": [[...] per restart], "control": ...}} and
`per_example.json` {arm: {clean, attacked, control: {clean, attacked}, restart_mean: {clean,
attacked}}}, the best restart's losses first, then the control's and the per-text mean over
restarts.
"""

from __future__ import annotations

from typing import Any

from monolm.attacks.stage import AttackRun, AttackStage, normalize
from monolm.core.artifacts import atomic_write_json
from monolm.study.frame import OnLog


def _attack(run: AttackRun, on_log: OnLog | None, progress: bool) -> dict[str, Any]:
    """{arm: {"gcg": results, "control": results or None}}."""
    from monolm.attacks import gcg

    texts = dict(opt_texts=run.opt[: run.cfg.attacks.gcg.n_opt_texts], eval_texts=run.held_out)
    grad = run.attack(gcg, on_log, progress, **texts)
    ctrl = run.attack(gcg, on_log, progress, control=True, **texts) if run.settings.random_control else {}
    return {arm: {"gcg": grad[arm], "control": ctrl.get(arm)} for arm in run.models}


def _gcg(run: AttackRun, on_log: OnLog | None, progress: bool) -> tuple[list[str], dict[str, Any]]:
    """Universal GCG and its random control per arm, reported on held-out texts, and transfer."""
    results = run.with_baseline(_attack(run, on_log, progress), "gcg_results.json")
    files = ["gcg_results.json"]
    if run.share is not None:  # the cell: both arms, their transfer, and what stage 7 reads
        _write_cell_files(run, results)
        files += ["triggers.json", "transfer.json", "per_example.json", "curves.json"]
    atomic_write_json(run.out / "gcg_results.json", results)
    return files, _metrics(results, run.memory_plan)


def _metrics(results: dict[str, Any], memory_plan) -> dict[str, Any]:
    """What stage 7 reads from the manifest: best-of-k effect per arm, the control's, the mean
    over restarts, triggers, and the budget curves' saturation."""
    with_control = all(r["control"] is not None for r in results.values())
    return {
        "per_model": {arm: normalize(r["gcg"]["eval"]) for arm, r in results.items()},
        "control": {arm: normalize(r["control"]["eval"]) for arm, r in results.items()} if with_control else None,
        "restart_mean": {arm: normalize(r["gcg"]["mean_over_restarts"]["eval"]) for arm, r in results.items()},
        "triggers": {arm: r["gcg"]["trigger_text"] for arm, r in results.items()},
        "trigger_ids": {arm: r["gcg"]["trigger_ids"] for arm, r in results.items()},
        "curves": {
            arm: {"attack": r["gcg"]["curves"], **({"control": r["control"]["curves"]} if r["control"] else {})}
            for arm, r in results.items()
        },
        "saturation": {
            arm: {kind: r[kind]["saturation"] for kind in ("gcg", "control") if r[kind] is not None}
            for arm, r in results.items()
        },
        "candidates_scored": {arm: r["gcg"]["candidates_scored"] for arm, r in results.items()},
        "memory_plan": memory_plan.to_json(),
    }


def _write_cell_files(run: AttackRun, results: dict[str, Any]) -> None:
    """A cell's GCG files over both arms: the transfer matrix, the triggers, the curves and
    `per_example.json`."""
    out = run.out
    transfer = run.trigger_transfer({arm: r["gcg"]["trigger_ids"] for arm, r in results.items()}, run.cfg.attacks.gcg)
    atomic_write_json(out / "transfer.json", {**transfer, "attack": "gcg"})
    atomic_write_json(
        out / "triggers.json",
        {
            arm: {
                "trigger_ids": r["gcg"]["trigger_ids"],
                "trigger_text": r["gcg"]["trigger_text"],
                "restarts": [
                    {k: u[k] for k in ("restart", "trigger_ids", "trigger_text", "opt_loss")}
                    for u in r["gcg"]["restarts"]
                ],
            }
            for arm, r in results.items()
        },
    )
    atomic_write_json(
        out / "curves.json",
        {arm: {kind: (r[kind] or {}).get("curves") for kind in ("gcg", "control")} for arm, r in results.items()},
    )
    atomic_write_json(out / "per_example.json", {arm: _per_example(r) for arm, r in results.items()})


def _per_example(r: dict[str, Any]) -> dict[str, Any]:
    g = r["gcg"]
    rec = {
        "clean": g["per_text"]["clean"],
        "attacked": g["per_text"]["attacked"],
        "restart_mean": {"clean": g["per_text"]["clean"], "attacked": g["mean_over_restarts"]["attacked"]},
    }
    if r["control"] is not None:
        rec["control"] = {"clean": r["control"]["per_text"]["clean"], "attacked": r["control"]["per_text"]["attacked"]}
    return rec


# The registry's entries (`monolm.study.registry`): the baseline's share and the cell's stage.
run_gcg_baseline = AttackStage("gcg_baseline", "gcg", _gcg)
run_gcg = AttackStage("gcg", "gcg", _gcg)
