"""The overflow part of the comparison report: the headroom plot and the overflow table.

Both read :class:`dsinstab.reports.run_data.RunData`: the ``diag/headroom_*`` and ``diag/underflow/*``
metrics of the ``headroom`` probe and the ``overflow`` events (``dsinstab.instruments.overflow``).
``docs/overflow-anatomy.md`` explains how to read them.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsinstab.instruments.overflow import FP16_MAX  # noqa: E402
from dsinstab.reports.render import mark_top_edge, number, save_figure  # noqa: E402
from dsinstab.reports.run_data import RunData  # noqa: E402

ROWS = (
    ("headroom_act", "max |activation| / 65504"),
    ("headroom_grad", "max |gradient × loss scale| / 65504"),
    ("underflow", "share of scaled gradient\nelements below 2^-24"),
)
OVERFLOW_COLUMNS = [
    "run",
    "precision",
    "overflows",
    "first overflow",
    "started in",
    "headroom before",
    "loss scale",
    "train/overflow_first",
]


def overflow_events(run: RunData) -> list[dict]:
    return [e for e in run.events if e.get("kind") == "overflow"]


def where(event: dict) -> str:
    """``model.layers.3.mlp.down_proj (forward)``; ``unlocated`` when no tracked tensor was
    non-finite (the overflow arose in gradient accumulation or the reduction across ranks)."""
    module = event.get("module")
    if module is None:
        return "unlocated"
    return f"{module or '(model)'} ({event['pass']})"


def overflow_first(run: RunData) -> Counter:
    """How many of the run's overflows started in each module and pass."""
    return Counter(where(e) for e in overflow_events(run))


def overflow_table(runs: list[RunData]) -> list[dict]:
    """One row per run: its overflow events, where the first began, that tensor's headroom in the
    last step recorded before it (fraction of 65504; gradients times the loss scale), and
    ``train/overflow_first``: where all of them began, most frequent first."""
    rows = []
    for run in runs:
        events = overflow_events(run)
        first = events[0] if events else {}
        counts = overflow_first(run)
        rows.append(
            {
                "run": run.name,
                "precision": run.precision,
                "overflows": len(events),
                "first overflow": first.get("step"),
                "started in": where(first) + (f", {first['tensor']}" if first.get("tensor") else "")
                if first
                else None,
                "headroom before": number(first.get("headroom_before")),
                "loss scale": first.get("loss_scale"),
                "train/overflow_first": ", ".join(f"{k} x{n}" for k, n in counts.most_common()) or None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The plot


def _layers(run: RunData, family: str) -> list[str]:
    keys = {k for r in run.metrics for k in r if k.startswith(f"diag/{family}/")}
    groups = [k.rsplit("/", 1)[1] for k in keys]
    return sorted(groups, key=lambda g: (0, 0) if g == "embed" else (1, int(g.split("_")[-1])))


def headroom_plot(runs: list[RunData], out: Path) -> Path | None:
    """``headroom.png``: one column per run with the headroom probe, rows for activations, scaled
    gradients and underflow, one line per layer over steps. The dashed line at 1 is 65504, fp16's
    largest finite value; a value past it (an overflow) sits on the top edge as a cross. Dotted
    verticals are the run's overflow events. ``None`` when no run has the probe."""
    runs = [r for r in runs if _layers(r, "headroom_act")]
    if not runs:
        return None
    fig, axes = plt.subplots(len(ROWS), len(runs), figsize=(5.5 * len(runs), 9), sharex="col", squeeze=False)
    for col, run in enumerate(runs):
        _, scale = run.series("diag/headroom_loss_scale")
        for row, (family, ylabel) in enumerate(ROWS):
            ax = axes[row][col]
            groups = _layers(run, family)
            cmap = plt.get_cmap("viridis", max(len(groups), 2))
            for i, g in enumerate(groups):
                steps, values = run.series(f"diag/{family}/{g}")
                values = [number(v) for v in values]
                ok = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v) and v > 0]
                over = [s for s, v in zip(steps, values) if v is not None and not math.isfinite(v)]
                ax.plot([s for s, _ in ok], [v for _, v in ok], color=cmap(i), lw=1.2, label=g)
                for s in over:
                    mark_top_edge(ax, s, marker="x", color=cmap(i), markersize=6)
            for e in overflow_events(run):
                ax.axvline(e["step"], color="#d62728", ls=":", lw=0.8, alpha=0.6)
            if family != "underflow":
                ax.set_yscale("log")
                ax.set_ylim(top=max(ax.get_ylim()[1], 3.0))  # the 65504 line inside, not on the frame
                ax.axhline(1.0, color="black", ls="--", lw=1)
                ax.annotate(
                    f"{FP16_MAX:.0f} (fp16 max)",
                    (0, 1.0),
                    xycoords=("axes fraction", "data"),
                    xytext=(4, 3),
                    textcoords="offset points",
                    fontsize=7,
                )
            else:
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3, which="both")
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            if row == 0:
                title = run.label
                if scale:
                    how = "the run's" if run.precision == "fp16" else "an assumed"
                    span = f"{scale[0]:g}" if scale[0] == scale[-1] else f"{scale[0]:g} → {scale[-1]:g}"
                    title += f"\ngradients × {how} loss scale ({span})"
                ax.set_title(title, fontsize=9)
            if row == len(ROWS) - 1:
                ax.set_xlabel("step")
            ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.suptitle("Headroom to fp16's limits per layer (dotted red: overflow events)", fontsize=10)
    return save_figure(fig, Path(out) / "headroom.png")
