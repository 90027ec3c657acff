"""The analysis of a sweep: final loss against learning rate, LR sensitivity, where training diverges.

Reads the run directories of a grid's points (wherever they ran) and writes ``report.md``, a
self-contained ``report.html`` and one PNG per plot into ``<sweep>/report/``, plus a wandb table
when the points log to wandb. docs/sweeps.md explains every number.

LR sensitivity follows Wortsman et al. 2023 (arXiv:2309.14322): E over eta in [3e-4, 3e-1] of
min(loss(eta), loss_0) - loss*, with loss_0 the loss at initialisation and loss* the loss of the
best learning rate of the same curve. One curve here is one variant at one seed; the spread over
seeds is the spread of that number.
"""

from __future__ import annotations

import html
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from dsinstab.experiments.sweep import Grid, Point  # noqa: E402
from dsinstab.reports.render import fmt, html_figure, html_page, html_table, markdown_table, save_figure  # noqa: E402
from dsinstab.reports.run_data import COLORS, ending, load_run  # noqa: E402
from dsinstab.reports.spike_score import name_scores, score_label  # noqa: E402
from dsinstab.reports.stats import spread  # noqa: E402
from dsinstab.run.config import ConfigError  # noqa: E402

LR_RANGE = (3e-4, 3e-1)  # Wortsman et al. 2023's [a, b]
# a run that ended here did not reach its last step: the learning rate diverged
DIVERGED_STATES = ("min_loss_scale", "stopped")


@dataclass
class PointResult:
    variant: str
    lr: float
    seed: int
    name: str
    precision: str | None = None
    state: str | None = None  # None: no run directory (not run yet)
    steps: int | None = None
    loss0: float | None = None  # eval loss at step 0
    final: float | None = None  # eval loss at the last step of a finished run (nan when it blew up)
    diverged: bool | None = None  # None: no result yet (not run, running, killed, crashed)
    max_attn_logit: float | None = None  # max over probe steps and layers of diag/attn_logit_max
    log_z: float | None = None  # diag/log_z at the last probe step
    spike_score: float | None = None  # spike/score_loss at the last logged step
    spikes: int | None = None  # detector firings (events.jsonl)
    skipped_steps: int | None = None  # train/skipped_steps at the last logged step

    @property
    def effective(self) -> float | None:
        """min(loss(eta), loss_0), a diverged run counting as loss_0 (its loss is no better)."""
        if self.diverged is None or self.loss0 is None:
            return None
        return self.loss0 if self.diverged else min(self.final, self.loss0)


def _last(run, key: str) -> float | None:
    vals = [v for v in run.series(key)[1] if isinstance(v, (int, float)) and math.isfinite(v)]
    return vals[-1] if vals else None


def point_result(point: Point) -> PointResult:
    r = PointResult(point.variant, point.lr, point.seed, point.name)
    if not point.run_dir.is_dir():
        return r
    try:
        run = load_run(point.run_dir)
    except ConfigError:  # killed before its first logged step
        r.state = "running"
        return r
    r.precision, r.state = run.precision, run.status.get("state", "running")
    r.steps = run.status.get("step")
    evals = run.series("eval/loss")
    r.loss0 = next((v for s, v in zip(*evals) if s == 0), None)
    if r.state == "finished":
        r.final = evals[1][-1] if evals[0] else None
        r.diverged = (
            r.final is None or not math.isfinite(r.final) or (r.loss0 is not None and r.final >= r.loss0)
        )
    elif r.state in DIVERGED_STATES:
        r.diverged = True
    attn = [
        v
        for row in run.metrics
        for k, v in row.items()
        if k.startswith("diag/attn_logit_max/") and isinstance(v, (int, float)) and math.isfinite(v)
    ]
    r.max_attn_logit = max(attn) if attn else None
    r.log_z = _last(run, "diag/log_z")
    r.spike_score = _last(run, "spike/score_loss")
    r.spikes = len(run.firings)
    skipped = _last(run, "train/skipped_steps")
    r.skipped_steps = int(skipped) if skipped is not None else None
    return r


def in_range(lr: float, lo: float = LR_RANGE[0], hi: float = LR_RANGE[1]) -> bool:
    return lo * (1 - 1e-9) <= lr <= hi * (1 + 1e-9)


def lr_sensitivity(curve: list[PointResult]) -> float | None:
    """E over the curve's learning rates in [3e-4, 3e-1] of min(loss, loss_0) - loss*, where loss*
    is the best final loss of the curve; ``None`` when no point of the range trained (nothing to
    measure from) or none has a result yet. Points without a result are left out of the mean."""
    pts = [p for p in curve if in_range(p.lr) and p.effective is not None]
    trained = [p.final for p in pts if not p.diverged]
    if not trained:
        return None
    best = min(trained)
    return statistics.fmean(p.effective - best for p in pts)


def variant_rows(results: list[PointResult], variants: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for v in variants:
        mine = [r for r in results if r.variant == v]
        per_seed = {s: lr_sensitivity([r for r in mine if r.seed == s]) for s in seeds}
        vals = [x for x in per_seed.values() if x is not None]
        by_lr: dict[float, list[PointResult]] = {}
        for r in mine:
            by_lr.setdefault(r.lr, []).append(r)
        # the largest learning rate at which every seed with a result trained
        ok = [
            lr
            for lr, rs in by_lr.items()
            if any(r.diverged is not None for r in rs)
            and all(r.diverged is False for r in rs if r.diverged is not None)
        ]
        means = {
            lr: statistics.fmean(r.final for r in rs)
            for lr, rs in by_lr.items()
            if rs and all(r.diverged is False for r in rs)
        }
        best_lr = min(means, key=means.get) if means else None
        rows.append(
            {
                "variant": v,
                "precision": ", ".join(sorted({r.precision for r in mine if r.precision})) or None,
                "points": f"{sum(r.diverged is not None for r in mine)}/{len(mine)}",
                "LR sensitivity": statistics.fmean(vals) if vals else None,
                "std over seeds": statistics.stdev(vals) if len(vals) > 1 else None,
                "LR sensitivity: median over seeds [interval] (coverage)": spread(vals),
                "per seed": ", ".join(f"s{s}: {_fmt(x)}" for s, x in per_seed.items()),
                "largest LR trained": max(ok) if ok else None,
                "diverged points": sum(bool(r.diverged) for r in mine),
                "best LR": best_lr,
                "best final eval loss": means.get(best_lr) if best_lr is not None else None,
            }
        )
    return rows


VARIANT_COLUMNS = [
    "variant",
    "precision",
    "points",
    "LR sensitivity",
    "std over seeds",
    "per seed",
    "largest LR trained",
    "diverged points",
    "best LR",
    "best final eval loss",
    "LR sensitivity: median over seeds [interval] (coverage)",
]
POINT_COLUMNS = [
    "name",
    "variant",
    "lr",
    "seed",
    "state",
    "steps",
    "loss0",
    "final",
    "diverged",
    "max_attn_logit",
    "log_z",
    "spike_score",
    "spikes",
    "skipped_steps",
]


# ---------------------------------------------------------------------------------------------
# Plots


def plot_vs_lr(results, variants, value, ylabel: str, title: str, path: Path, logy=False, diverged=False):
    """One line per variant: the mean over seeds at each learning rate, the bar from the lowest to
    the highest seed; with ``diverged``, points that diverged without a finite final loss (fp16
    died, or nan) as crosses at their loss at init."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for v, color in zip(variants, COLORS * 4):
        by_lr: dict[float, list[float]] = {}
        for r in results:
            x = value(r) if r.variant == v else None
            if x is not None and math.isfinite(x):
                by_lr.setdefault(r.lr, []).append(x)
        lrs = sorted(by_lr)
        if lrs:
            drawn = True
            mean = [statistics.fmean(by_lr[lr]) for lr in lrs]
            err = [
                [m - min(by_lr[lr]) for lr, m in zip(lrs, mean)],
                [max(by_lr[lr]) - m for lr, m in zip(lrs, mean)],
            ]
            ax.errorbar(lrs, mean, yerr=err, color=color, marker="o", ms=4, capsize=3, lw=1.5, label=v)
        if diverged:
            bad = [  # no finite loss to draw: marked at the loss at init, as LR sensitivity counts it
                r
                for r in results
                if r.variant == v
                and r.diverged
                and r.loss0 is not None
                and (r.final is None or not math.isfinite(r.final))
            ]
            if bad:
                drawn = True
                ax.plot(
                    [r.lr for r in bad],
                    [r.loss0 for r in bad],
                    "x",
                    color=color,
                    ms=9,
                    mew=2,
                    label=f"{v}: diverged, no finite loss (drawn at its loss at init)",
                )
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel="peak learning rate", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_sensitivity(results, variants, seeds, path: Path):
    fig, ax = plt.subplots(figsize=(8, 4))
    drawn = False
    for i, (v, color) in enumerate(zip(variants, COLORS * 4)):
        vals = [lr_sensitivity([r for r in results if r.variant == v and r.seed == s]) for s in seeds]
        vals = [x for x in vals if x is not None]
        if not vals:
            continue
        drawn = True
        ax.bar(
            i,
            statistics.fmean(vals),
            color=color,
            alpha=0.6,
            yerr=statistics.stdev(vals) if len(vals) > 1 else None,
            capsize=4,
        )
        ax.plot([i] * len(vals), vals, "o", color="black", ms=4)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(variants)), variants)
    ax.set(
        ylabel="LR sensitivity",
        title="LR sensitivity per variant (bar: mean over seeds, ±1 std; dots: seeds)",
    )
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# The report


def write_sweep_report(grid: Grid, out: str | Path | None = None) -> Path:
    """Plots, report.md and report.html of the grid's points; returns the folder."""
    out = Path(out) if out else grid.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = [point_result(p) for p in grid.points]
    vrows = variant_rows(results, grid.variants, grid.seeds)
    prows = [asdict(r) | {"state": ending(r.state, r.state or "not run")} for r in results]
    # the spike score is named by its window (OLMo 2's only at 1000): in the header, or in each cell
    spikes = [p.cfg.trainer.spikes for p in grid.points]
    labels = [score_label(s.score_window, s.score_sigma) for s in spikes]
    pcols, prows = name_scores(POINT_COLUMNS, prows, labels, ("spike_score",), cell=_fmt)
    label = labels[0] if len(set(labels)) == 1 else "windows differ"
    V = grid.variants
    plots = [
        plot_vs_lr(
            results,
            V,
            lambda r: r.final,
            "final eval loss",
            "Final eval loss against learning rate (mean over seeds, bar: lowest to highest seed)",
            out / "loss_vs_lr.png",
            diverged=True,
        ),
        plot_sensitivity(results, V, grid.seeds, out / "lr_sensitivity.png"),
        plot_vs_lr(
            results,
            V,
            lambda r: r.max_attn_logit,
            "max attention logit (any layer, any probe step)",
            "Largest pre-softmax attention logit against learning rate",
            out / "attn_logit_vs_lr.png",
            logy=True,
        ),
        plot_vs_lr(
            results,
            V,
            lambda r: r.log_z,
            "log Z at the last probe step",
            "Output log Z against learning rate",
            out / "log_z_vs_lr.png",
        ),
        plot_vs_lr(
            results,
            V,
            lambda r: r.spike_score,
            f"spike score (loss, {label}), end of run",
            f"Spike score ({label}) against learning rate",
            out / "spike_score_vs_lr.png",
        ),
        plot_vs_lr(
            results,
            V,
            lambda r: r.skipped_steps,
            "skipped steps (overflow or non-finite)",
            "Skipped steps against learning rate",
            out / "skipped_steps_vs_lr.png",
        ),
    ]
    plots = [p for p in plots if p is not None]
    notes = _notes(results)
    title = f"dsinstab sweep: {grid.name}"
    (out / "report.md").write_text(_markdown(title, vrows, (pcols, prows), notes, plots))
    (out / "report.html").write_text(_html(title, vrows, (pcols, prows), notes, plots))
    cfg = grid.points[0].cfg.utils
    if cfg.report_to == "wandb":
        log_to_wandb(out, vrows, (pcols, prows), cfg.wandb_project, f"{grid.name}-report", grid.name)
    return out


DEFINITIONS = (
    "LR sensitivity (Wortsman et al. 2023, arXiv:2309.14322): the mean over the swept learning rates "
    "eta in [3e-4, 3e-1] of min(loss(eta), loss_0) - loss*, where loss(eta) is the final eval loss, "
    "loss_0 the eval loss at step 0 and loss* the best final eval loss of the same curve (one variant, "
    "one seed); the spread is over seeds. A point diverged when it did not finish (died at the fp16 "
    "minimum loss scale, stopped by a detector) or finished with a final eval loss that is not finite "
    "or not below loss_0; it counts as loss_0. Points without a result yet are left out."
)


def _notes(results: list[PointResult]) -> list[str]:
    notes = []
    missing = [r.name for r in results if r.diverged is None]
    if missing:
        notes.append(
            f"{len(missing)} point(s) have no result yet (not run, running, killed or crashed): "
            + ", ".join(missing[:6])
            + (", ..." if len(missing) > 6 else "")
        )
    outside = sorted({r.lr for r in results if not in_range(r.lr)})
    if outside:
        notes.append(
            "learning rates outside [3e-4, 3e-1] are plotted but not in the LR sensitivity: "
            + ", ".join(f"{lr:g}" for lr in outside)
        )
    return notes


def _fmt(v, digits: int = 4) -> str:
    """A sweep's table cell: :func:`fmt`, with flags as yes/no and three significant digits where a
    number is very small or very large (learning rates)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and v and math.isfinite(v) and (abs(v) < 1e-2 or abs(v) >= 1e5):
        return fmt(v, 3)
    return fmt(v, digits)


def _markdown(title, vrows, points, notes, plots) -> str:
    lines = [f"# {title}", "", DEFINITIONS, ""] + [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += [
        markdown_table(VARIANT_COLUMNS, vrows, cell=_fmt),
        markdown_table(*points, cell=_fmt),
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _html(title, vrows, points, notes, plots) -> str:
    warn = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
    body = (
        f"<p>{html.escape(DEFINITIONS)}</p>{warn}"
        f"<h2>Per variant</h2>{html_table(VARIANT_COLUMNS, vrows, cell=_fmt)}"
        f"<h2>Per point</h2>{html_table(*points, cell=_fmt)}" + "".join(html_figure(p) for p in plots)
    )
    return html_page(title, body, width=1200)


def log_to_wandb(out: Path, vrows, points, project: str, name: str, group: str) -> None:
    """The two tables, the plots and report.html as one wandb run in the sweep's group."""
    import wandb

    from dsinstab.run.tracking import log_report

    def table(cols, rows):
        return wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])

    tables = {"table/variants": table(VARIANT_COLUMNS, vrows), "table/points": table(*points)}
    log_report(out, project, name, group, tables)
