"""How the reports name a spike score: by the window (and sigma) it was computed with.

OLMo 2's spike score ("2 OLMo 2 Furious", arXiv:2501.00656) is the share of values at least 7 std
away from a rolling mean of the last 1000; ``trainer.spikes.score_window`` and ``score_sigma`` set
both numbers (the shipped grids use windows of 20 to 200), so a report names the window beside
every score and calls a score OLMo 2's only where both numbers are OLMo 2's.
"""

from __future__ import annotations

from dsinstab.reports.render import fmt

OLMO2 = (1000, 7.0)  # OLMo 2's window and sigma


def score_label(window: int | None, sigma: float | None = 7.0) -> str:
    """``window 20``, ``window 20, 5 sigma``, or ``OLMo 2's, window 1000``."""
    if window is None:
        return "window unknown"
    sigma = 7.0 if sigma is None else sigma
    if (window, sigma) == OLMO2:
        return "OLMo 2's, window 1000"
    return f"window {window}" + ("" if sigma == 7 else f", {sigma:g} sigma")


def run_label(config: dict) -> str:
    """:func:`score_label` of a run directory's ``config.yaml``."""
    spikes = (config or {}).get("trainer", {}).get("spikes", {})
    return score_label(spikes.get("score_window"), spikes.get("score_sigma"))


def name_scores(
    columns: list[str], rows: list[dict], labels: list[str], scores: tuple[str, ...], cell=fmt
) -> tuple[list[str], list[dict]]:
    """``columns`` and ``rows`` with each spike-score column (``scores``) named by its window: in
    the header where every row has the same label (``labels``, one per row), else in each cell."""
    if len(set(labels)) <= 1:
        label = labels[0] if labels else "window unknown"
        named = {c: f"{c} ({label})" for c in scores}
        return [named.get(c, c) for c in columns], [r | {named[c]: r.get(c) for c in scores} for r in rows]
    return columns, [
        r | {c: f"{cell(r.get(c), 4)} ({label})" for c in scores} for r, label in zip(rows, labels)
    ]
