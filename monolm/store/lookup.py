"""Finding a run by what a user has in hand: its ID, its name (the results folder), or the start
of either. An unknown or ambiguous reference is answered with the runs it could have meant."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any


class UnknownRun(KeyError):
    """No run (or more than one) matches a reference; the message lists the closest known runs."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""


def _listing(runs: Sequence[dict[str, Any]], limit: int = 5) -> str:
    shown = [
        f"{r['run_id']} ({(r.get('created_at') or '?')[:16].replace('T', ' ')}, {r.get('status')})"
        for r in runs[:limit]
    ]
    more = f", and {len(runs) - limit} more" if len(runs) > limit else ""
    return "; ".join(shown) + more


def match_run(ref: str, runs: Sequence[dict[str, Any]], where: str) -> dict[str, Any]:
    """The one run `ref` names among `runs` (oldest first): an exact run ID, else an exact run
    name, else a unique prefix of an ID or name. `UnknownRun` lists the candidates of an
    ambiguous reference, or the closest IDs and names of an unknown one."""
    by_id = [r for r in runs if r["run_id"] == ref]
    if by_id:
        return by_id[0]
    for candidates, what in (
        ([r for r in runs if r.get("run_name") == ref], "run name"),
        ([r for r in runs if r["run_id"].startswith(ref) or (r.get("run_name") or "").startswith(ref)], "prefix"),
    ):
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise UnknownRun(
                f"{what} {ref!r} matches {len(candidates)} runs in {where}: {_listing(candidates[::-1])}; "
                "give a longer prefix or the full run ID"
            )
    if not runs:
        raise UnknownRun(f"no run {ref!r}: the results store {where} holds no runs yet")
    names = {r["run_id"]: r for r in runs} | {r["run_name"]: r for r in runs if r.get("run_name")}
    close = difflib.get_close_matches(ref, list(names), n=5, cutoff=0.3)
    suggestions = list({names[c]["run_id"]: names[c] for c in close}.values()) or list(runs[::-1])
    raise UnknownRun(
        f"no run {ref!r} in results store {where}; {'closest' if close else 'latest'} known runs: "
        f"{_listing(suggestions)} (`monolm results` lists every run with its ID)"
    )
