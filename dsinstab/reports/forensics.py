"""What moved first: which series left its band before a loss spike, and by how many steps.

Every ``diag/`` series and the train metrics that describe the step (loss, grad norm, loss scale,
overflow, z-loss) are normalised to their own baseline, the logged steps before a window that
ends at the spike: a robust line through the baseline (Theil-Sen: the median of pairwise slopes,
so a steadily growing norm is not mistaken for a departure) and the robust spread of the
residuals (1.4826 x their median absolute deviation). A series *leaves its band* at the first step
of the window where it lies more than ``k`` such sigmas off its line; a non-finite value is out of
band by definition. The table lists the series in the order they left, with how many steps before
the loss did; the heat map shows every series' deviation (series x steps).

Usable on any run with probes: ``python -m dsinstab.reports.forensics RUN --at STEP`` (the replay report
uses it on its plain replay, where every probe runs every step).
"""

from __future__ import annotations

import argparse
import html
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dsinstab.run.config import ConfigError

TRAIN_SERIES = (
    "train/loss",
    "train/grad_norm",
    "train/loss_scale",
    "train/overflow",
    "train/z_loss",
    "train/ce_loss",
)
LOSS = "train/loss"
MIN_BASELINE = 3  # logged steps a band needs, at least
COLUMNS = [
    "series",
    "left its band at step",
    "steps before the loss",
    "deviation there (sigma)",
    "peak deviation (sigma)",
]


@dataclass
class Timeline:
    steps: list[int]  # every logged step shown, baseline and window
    window_start: int  # first step judged; before it, the baseline
    spike_step: int  # the step asked about
    loss_step: int | None  # where train/loss left its band (None: it did not)
    k: float
    z: dict[str, list[float]] = field(
        default_factory=dict
    )  # per series, one deviation per step (nan: absent)
    table: list[dict] = field(default_factory=list)  # the series that left, in the order they left

    @property
    def reference(self) -> int:
        """The step leads are counted to: the loss's departure, else the step asked about."""
        return self.loss_step if self.loss_step is not None else self.spike_step

    def sentence(self) -> str:
        """One line: the first series out and its lead, or that nothing left its band."""
        if not self.table:
            return f"No series left its {self.k:g}-sigma band in steps {self.window_start}..{self.steps[-1]}."
        first = self.table[0]
        lead = first["steps before the loss"]
        loss = (
            f"the loss left its band at step {self.loss_step}"
            if self.loss_step
            else f"the loss stayed in its band (step {self.spike_step} asked)"
        )
        when = (
            "with the loss"
            if lead == 0
            else (f"{lead} step(s) before" if lead > 0 else f"{-lead} step(s) after")
        )
        tied = [
            r["series"]
            for r in self.table[1:]
            if r["left its band at step"] == first["left its band at step"]
        ]
        also = f" (with {len(tied)} other series at the same step)" if tied else ""
        return (
            f"First to leave its {self.k:g}-sigma band: {first['series']} at step {first['left its band at step']}, "
            f"{when}{also}; {loss}."
        )


def series_names(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("diag/") or k in TRAIN_SERIES}
    return sorted(keys, key=lambda k: (not k.startswith("train/"), k))


def _theil_sen(xs: list[float], ys: list[float]) -> tuple[float, float]:
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i])
        for i in range(len(xs))
        for j in range(i + 1, len(xs))
        if xs[j] != xs[i]
    ]
    slope = statistics.median(slopes) if slopes else 0.0
    intercept = statistics.median(y - slope * x for x, y in zip(xs, ys))
    return slope, intercept


def band(xs: list[int], ys: list[float]) -> tuple[float, float, float] | None:
    """(slope, intercept, sigma) of a series' baseline; ``None`` with too few finite points."""
    pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    if len(pts) < MIN_BASELINE:
        return None
    px, py = [float(x) for x, _ in pts], [float(y) for _, y in pts]
    slope, intercept = _theil_sen(px, py)
    resid = [y - (intercept + slope * x) for x, y in zip(px, py)]
    mad = statistics.median(abs(r - statistics.median(resid)) for r in resid)
    level = statistics.median(abs(y) for y in py)
    # a flat series (overflow flags, a constant loss scale) would otherwise have no spread at all
    sigma = max(1.4826 * mad, 1e-3 * level, 1e-12)
    return slope, intercept, sigma


def timeline(
    rows: list[dict], spike_step: int, lookback: int = 10, k: float = 4.0, baseline_len: int = 30
) -> Timeline:
    """The normalised timeline of ``rows`` (metrics.jsonl records) around ``spike_step``.

    The window starts ``lookback`` logged steps before the spike (at most half of the steps
    logged before it); the baseline is the ``baseline_len`` logged steps before the window.
    """
    by_step: dict[int, dict] = {}
    for r in rows:
        if "step" in r and (
            any(key in r for key in TRAIN_SERIES) or any(key.startswith("diag/") for key in r)
        ):
            by_step.setdefault(r["step"], {}).update(r)
    steps = sorted(by_step)
    before = [s for s in steps if s < spike_step]
    lookback = min(lookback, len(before) // 2)  # a short run keeps at least half for its baseline
    if len(before) - lookback < MIN_BASELINE:
        raise ConfigError(
            f"--at {spike_step}: the run logged {len(before)} step(s) before it; a band needs at least {MIN_BASELINE}."
        )
    window_start = before[len(before) - lookback] if lookback else spike_step
    baseline = [s for s in before if s < window_start][-baseline_len:]
    shown = [s for s in steps if s >= baseline[0]]
    tl = Timeline(shown, window_start, spike_step, None, k)
    for name in series_names([by_step[s] for s in shown]):
        b = band(baseline, [by_step[s].get(name, math.nan) for s in baseline])
        if b is None:
            continue
        slope, intercept, sigma = b
        zs = []
        for s in shown:
            v = by_step[s].get(name)
            if not isinstance(v, (int, float)):
                zs.append(math.nan)
            elif not math.isfinite(v):
                zs.append(math.inf)  # nan and inf are as far out as a value goes
            else:
                zs.append((v - intercept - slope * s) / sigma)
        tl.z[name] = zs
    for name, zs in tl.z.items():
        out = [(s, z) for s, z in zip(shown, zs) if s >= window_start and not math.isnan(z) and abs(z) > k]
        if name == LOSS:  # the loss spikes upward; a falling loss is no spike
            up = [(s, z) for s, z in out if z > 0]
            tl.loss_step = up[0][0] if up else None
        if out:
            judged = [abs(z) for s, z in zip(shown, zs) if s >= window_start and not math.isnan(z)]
            tl.table.append(
                {
                    "series": name,
                    "left its band at step": out[0][0],
                    "deviation there (sigma)": out[0][1],
                    "peak deviation (sigma)": max(judged),
                }
            )
    for row in tl.table:
        row["steps before the loss"] = tl.reference - row["left its band at step"]
    tl.table.sort(key=lambda r: (r["left its band at step"], -abs(r["deviation there (sigma)"])))
    return tl


def heatmap(tl: Timeline, path: Path, title: str = "What moved first") -> Path:
    """Series x steps, each cell the signed deviation in sigmas, compressed (sign x log10(1 + |z|))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dsinstab.reports.render import save_figure

    order = [r["series"] for r in tl.table] + [n for n in tl.z if n not in {r["series"] for r in tl.table}]
    data = np.array(
        [
            [
                math.copysign(math.log10(1 + min(abs(z), 1e6)), z) if not math.isnan(z) else np.nan
                for z in tl.z[n]
            ]
            for n in order
        ]
    )
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * len(tl.steps), 16), min(1.5 + 0.22 * len(order), 14)))
    vmax = math.log10(1 + 100)
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(order)), [n.removeprefix("diag/") for n in order], fontsize=6)
    ticks = list(range(0, len(tl.steps), max(1, len(tl.steps) // 20)))
    ax.set_xticks(ticks, [str(tl.steps[i]) for i in ticks], fontsize=7)
    for step, style, label in ((tl.window_start, ":", "window"), (tl.reference, "-", "loss spike")):
        if step in tl.steps:
            ax.axvline(tl.steps.index(step) - 0.5, color="black", ls=style, lw=1, label=label)
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("deviation: sign x log10(1 + |sigma|)")
    ax.set(xlabel="step", title=f"{title} (band: {tl.k:g} sigma; rows in the order they left)")
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# python -m dsinstab.reports.forensics RUN --at STEP


def main(argv: list[str] | None = None) -> int:
    from dsinstab.reports.render import html_figure, html_page, html_table, markdown_table
    from dsinstab.run.tracking import read_jsonl

    p = argparse.ArgumentParser(
        prog="python -m dsinstab.reports.forensics",
        description="Which series left its band first before a loss spike.",
    )
    p.add_argument("run", metavar="RUN", help="a run directory (probes on: trainer.diagnostics.every)")
    p.add_argument("--at", type=int, required=True, metavar="STEP", help="the spike's step")
    p.add_argument(
        "--lookback",
        type=int,
        default=10,
        help="steps before the spike that are judged (default: %(default)s)",
    )
    p.add_argument(
        "--k", type=float, default=4.0, help="band half-width in robust sigmas (default: %(default)s)"
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN/forensics-STEP)")
    args = p.parse_args(argv)
    metrics = Path(args.run) / "metrics.jsonl"
    try:
        if not metrics.exists():
            raise ConfigError(f"RUN: {args.run} is not a run directory (it needs metrics.jsonl).")
        tl = timeline(read_jsonl(metrics), args.at, args.lookback, args.k)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / f"forensics-{args.at}"
    out.mkdir(parents=True, exist_ok=True)
    fig = heatmap(tl, out / "what_moved_first.png")
    (out / "report.md").write_text(
        f"# What moved first\n\n{tl.sentence()}\n\n{markdown_table(COLUMNS, tl.table, 3)}\n![{fig.stem}]({fig.name})\n"
    )
    (out / "report.html").write_text(
        html_page(
            "What moved first",
            f"<p>{html.escape(tl.sentence())}</p>" + html_table(COLUMNS, tl.table, 3) + html_figure(fig),
        )
    )
    print(tl.sentence())
    print(f"report: {out / 'report.html'} (and report.md, {fig.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
