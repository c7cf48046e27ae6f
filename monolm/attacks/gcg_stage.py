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

import time
from typing import Any

from monolm.attacks.stage import _attack_arms, _models, _open_stage, _outputs, _share, _transfer_means, normalize
from monolm.config import ExperimentConfig
from monolm.core.artifacts import atomic_write_json, read_json
from monolm.core.runtime import pick_device
from monolm.data.stage import model_dir
from monolm.memory import plans as planning
from monolm.study.frame import Inputs, OnLog, StageRef, existing, finish, read_output
from monolm.study.layout import CellPaths


def run_gcg_baseline(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """The GCG stage's share that does not depend on the constraint: the baseline, once per
    (model, seed) for every cell of the grid."""
    return run_gcg(cfg, cell, inputs, progress=progress, on_log=on_log, stage="gcg_baseline")


def _attack(cfg, gcg_cfg, models, out, on_log, tokenizer, opt, held_out, seed, progress) -> dict[str, Any]:
    """{arm: {"gcg": results, "control": results or None}}."""
    from monolm.attacks import gcg

    common = dict(
        tokenizer=tokenizer,
        opt_texts=opt,
        eval_texts=held_out,
        cfg=gcg_cfg,
        seed=seed,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
        progress=progress,
    )
    grad = _attack_arms(gcg, models, out, on_log, **common)
    ctrl = _attack_arms(gcg, models, out, on_log, control=True, **common) if gcg_cfg.random_control else {}
    return {arm: {"gcg": grad[arm], "control": ctrl.get(arm)} for arm in models}


def run_gcg(
    cfg: ExperimentConfig,
    cell: CellPaths,
    inputs: Inputs,
    *,
    progress: bool = True,
    on_log: OnLog | None = None,
    stage: str = "gcg",
) -> StageRef:
    """Universal GCG and its random control per arm, reported on held-out texts, and transfer."""
    done = existing(cfg, cell, stage, inputs)
    if done:
        return done
    started = time.time()
    share = _share(inputs, "gcg")
    arms = ("monotonic",) if share is not None else ("baseline",)
    gcg_cfg, memory_plan = planning.plan_attack_stage(cfg, "gcg", model_dir(inputs["setup"]), pick_device(), name=stage)
    out, tokenizer, (opt, held_out) = _open_stage(cfg, cell, stage, inputs)
    opt = opt[: cfg.attacks.gcg.n_opt_texts]
    models = _models(inputs, arms, pick_device())
    results = _attack(cfg, gcg_cfg, models, out, on_log, tokenizer, opt, held_out, cell.seed, progress)
    files = ["gcg_results.json"]
    if share is not None:
        results = {"baseline": read_output(share, "gcg_results.json")["baseline"], **results}
        models = {**_models(inputs, ("baseline",), pick_device()), **models}
        _write_cell_files(cfg, cell.seed, out, tokenizer, models, results, held_out)
        files += ["triggers.json", "transfer.json", "per_example.json", "curves.json"]
    atomic_write_json(out / "gcg_results.json", results)
    metrics = _metrics(results, memory_plan)
    if share is not None:
        metrics["transfer"] = _transfer_means(read_json(out / "transfer.json"))
    return finish(cfg, cell, stage, inputs=inputs, outputs=_outputs(out, files, arms), metrics=metrics, started=started)


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


def _write_cell_files(cfg, seed, out, tokenizer, models, results, held_out) -> None:
    from monolm.attacks import uat
    from monolm.attacks.scoring import context_prefix

    transfer = uat.transfer_matrix(
        models,
        {arm: r["gcg"]["trigger_ids"] for arm, r in results.items()},
        held_out[: cfg.attacks.gcg.n_eval_texts],
        prefix=context_prefix(tokenizer),
        seed=seed,
        success_threshold=cfg.attacks.success_threshold,
        text_max_tokens=cfg.attacks.gcg.text_max_tokens,
        bf16=cfg.attacks.bf16,
    )
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
