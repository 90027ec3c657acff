"""Runs aligned by step: plots and the comparison report (runs are read by :mod:`dsinstab.reports.run_data`).

``python scripts/compare.py RUN [RUN ...] --out DIR`` writes PNG plots, ``report.md`` and a
self-contained ``report.html`` (plots embedded). The first two runs are the pair the difference
plot compares, typically fp16 and bf16 with the same seed and data. ``docs/reading-the-report.md``
explains every plot and every column. :func:`run_summary` is what ``scripts/train.py`` prints when a
run ends.
"""

from __future__ import annotations

import html
import math
import os
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from dsinstab.reports import overflow_report  # noqa: E402
from dsinstab.reports.render import (  # noqa: E402
    fmt,
    html_figure,
    html_page,
    html_table,
    mark_top_edge,
    markdown_table,
    number,
    save_figure,
)
from dsinstab.reports.run_data import COLORS, RunData, ending, load_run  # noqa: E402
from dsinstab.reports.spike_score import name_scores, run_label  # noqa: E402
from dsinstab.run.config import ConfigError  # noqa: E402
from dsinstab.run.tracking import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "reading-the-report.md"
# diag/ families drawn on a log scale: positive quantities that grow by orders of magnitude
LOG_FAMILIES = ("attn_logit_max", "grad_norm", "param_norm", "update_ratio", "adam_rms_over_eps", "act_rms")


# ---------------------------------------------------------------------------------------------
# The numbers


def longest_run(flags: list[int]) -> int:
    best = cur = 0
    for f in flags:
        cur = cur + 1 if f else 0
        best = max(best, cur)
    return best


def summarize(run: RunData) -> dict:
    """The table row of one run: how it ended, its losses and its instabilities."""
    _, evals = run.series("eval/loss")
    finite_evals = [v for v in evals if math.isfinite(v)]
    steps, overflow = run.series("train/overflow")
    _, scale = run.series("train/loss_scale")
    _, tps = run.series("train/tokens_per_s")
    min_scale = run.config.get("ds_config", {}).get("fp16", {}).get("min_loss_scale", 1)
    train_rows = [r for r in run.metrics if "train/loss" in r]
    last = train_rows[-1]
    return {
        "run": run.name,
        "precision": run.precision,
        "ended": ending(run.status.get("state")),
        "steps": last["step"],
        "final eval loss": evals[-1] if evals else None,
        "best eval loss": min(finite_evals) if finite_evals else None,
        "final train loss": last["train/loss"],
        "spikes": len(run.firings),
        "spike kinds": spike_kinds(run.firings),
        "rollbacks": sum(e.get("kind") == "rollback" for e in run.events),
        "overflow steps": int(sum(overflow)),
        "longest overflow run": longest_run(overflow),
        "steps at min scale": sum(1 for s in scale if s <= min_scale),
        "first overflow": next((s for s, o in zip(steps, overflow) if o), None),
        "spike score loss": last.get("spike/score_loss"),
        "spike score grad": last.get("spike/score_grad_norm"),
        "tokens/s": statistics.median(tps) if tps else None,
    }


def spike_kinds(firings: list[tuple[int, str]]) -> str | None:
    """``loss_spike (9), overflow_run x2 (24, 40)``: each kind with the steps it fired at."""
    steps: dict[str, list[int]] = {}
    for step, kind in firings:
        steps.setdefault(kind, []).append(step)
    if not steps:
        return None
    parts = []
    for kind, at in steps.items():
        shown = ", ".join(map(str, at[:3])) + (", ..." if len(at) > 3 else "")
        parts.append(f"{kind} ({shown})" if len(at) == 1 else f"{kind} x{len(at)} ({shown})")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The plots


def _mark_events(ax, run: RunData, color: str, key: str, size: float = 9) -> None:
    """Spikes as triangles, rollbacks as diamonds, on the run's own curve. Where the curve has no
    finite value at the event's step (an inf or nan loss), the marker sits on the top edge of the
    axes, labelled with the value where it changes (one "nan" for a run of them)."""
    at = dict(zip(*run.series(key)))
    last_label = None
    for e in run.events:
        step = e.get("step")
        if e.get("kind") != "rollback" and not e.get("firings"):
            continue  # not a spike: DeepSpeed giving up or a failed checkpoint ends the curve instead
        y = number(at.get(step))
        if y is None:  # not logged at this step (log_every > 1): the event's own record of it
            y = number(next((r.get(key) for r in e.get("recent", []) if r.get("step") == step), None))
        style = dict(
            marker="D" if e["kind"] == "rollback" else "^",
            color=color,
            markersize=size,
            markeredgecolor="black",
            zorder=5,
        )
        if y is not None and math.isfinite(y):
            ax.plot([step], [y], **style)
        else:
            mark_top_edge(ax, step, **style)
            label = "nan" if y is None or math.isnan(y) else "inf"
            if label == last_label:
                continue
            last_label = label
            ax.annotate(
                label,
                (step, 1.0),
                xycoords=ax.get_xaxis_transform(),
                xytext=(6, -10),
                textcoords="offset points",
                fontsize=8,
                color=color,
            )


def _draw_losses(ax, runs: list[RunData]) -> None:
    for i, (run, color) in enumerate(zip(runs, COLORS)):
        steps, loss = run.series("train/loss")
        ax.plot(steps, loss, color=color, lw=1, alpha=0.8, label=f"{run.label} train")
        es, ev = run.series("eval/loss")
        ax.plot(es, ev, color=color, lw=2, ls="--", marker="o", markersize=3, label=f"{run.label} eval")
        _mark_events(ax, run, color, "train/loss", size=max(10 - 2.5 * i, 5))  # later runs' inside
        if run.status.get("state") in ("min_loss_scale", "stopped", "checkpoint_failed"):
            ax.axvline(
                run.end_step,
                color=color,
                ls=":",
                lw=1.5,
                label=f"{run.name}: {ending(run.status['state'])} at step {run.end_step}",
            )
    ax.set(
        xlabel="step", ylabel="loss", title="Loss (▲ spike, ◆ rollback; on the top edge: at an inf/nan loss)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_losses(runs: list[RunData], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _draw_losses(ax, runs)
    return save_figure(fig, out / "loss.png")


def plot_overview(runs: list[RunData], out: Path) -> Path | None:
    """Loss above, fp16 loss scale below, on one step axis: the figure for a README."""
    if not any(r.series("train/loss_scale")[0] for r in runs):
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 2])
    _draw_losses(top, runs)
    top.set_xlabel("")
    _draw_loss_scale(bottom, runs)
    return save_figure(fig, out / "overview.png")


def plot_grad_norm(runs: list[RunData], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (run, color) in enumerate(zip(runs, COLORS)):
        steps, gn = run.series("train/grad_norm")
        pts = [(s, g) for s, g in zip(steps, gn) if math.isfinite(g) and g > 0]
        ax.plot([s for s, _ in pts], [g for _, g in pts], color=color, lw=1, label=run.label)
        _mark_events(ax, run, color, "train/grad_norm", size=max(10 - 2.5 * i, 5))
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="global grad norm (before clipping)", title="Gradient norm")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "grad_norm.png")


def plot_loss_scale(runs: list[RunData], out: Path) -> Path | None:
    if not any(r.series("train/loss_scale")[0] for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    _draw_loss_scale(ax, runs)
    return save_figure(fig, out / "loss_scale.png")


def _draw_loss_scale(ax, runs: list[RunData]) -> None:
    fp16 = [(r, c) for r, c in zip(runs, COLORS) if r.series("train/loss_scale")[0]]
    for run, color in fp16:
        steps, scale = run.series("train/loss_scale")
        ax.step(steps, scale, where="post", color=color, lw=1.5, label=f"{run.label} loss scale")
        osteps, flags = run.series("train/overflow")
        at = dict(zip(steps, scale))
        skipped = [s for s, f in zip(osteps, flags) if f and s in at]
        ax.plot(
            skipped,
            [at[s] for s in skipped],
            "x",
            color="black",
            markersize=5,
            label=f"{run.name}: overflow, step skipped ({len(skipped)})",
        )
        min_scale = run.config.get("ds_config", {}).get("fp16", {}).get("min_loss_scale")
        if min_scale:
            ax.axhline(min_scale, color=color, ls=":", lw=1)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="step", ylabel="loss scale", title="fp16 dynamic loss scale (dotted: DeepSpeed's minimum)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_loss_difference(a: RunData, b: RunData, out: Path) -> Path:
    sa, la = a.series("train/loss")
    sb, lb = b.series("train/loss")
    common = sorted(set(sa) & set(sb))
    da, db = dict(zip(sa, la)), dict(zip(sb, lb))
    diff = [(s, da[s] - db[s]) for s in common if math.isfinite(da[s]) and math.isfinite(db[s])]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.axhline(0, color="gray", lw=0.8)
    ax.plot([s for s, _ in diff], [d for _, d in diff], color="#444", lw=1)
    for s in common:  # where one side is non-finite, the difference is undefined: mark it
        if not (math.isfinite(da[s]) and math.isfinite(db[s])):
            ax.axvspan(s - 0.5, s + 0.5, color="#d62728", alpha=0.15, lw=0)
    ax.set(
        xlabel="step",
        ylabel=f"loss {a.name} − {b.name}",
        title="Per-step training loss difference (shaded: one side non-finite)",
    )
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "loss_difference.png")


def plot_diagnostics(runs: list[RunData], out: Path, prefix: str = "diag/") -> list[Path]:
    """One plot per diagnostic family (``diag/<family>/layer_<i>`` or ``diag/<name>``), all runs."""
    families: dict[str, set[str]] = {}
    for run in runs:
        for r in run.metrics:
            for k in r:
                if k.startswith(prefix):
                    families.setdefault(k[len(prefix) :].split("/")[0], set()).add(k)
    paths = []
    for family, keys in sorted(families.items()):
        fig, ax = plt.subplots(figsize=(9, 4))
        for run, color in zip(runs, COLORS):
            for i, key in enumerate(sorted(keys)):
                steps, vals = run.series(key)
                if steps:
                    ax.plot(
                        steps,
                        vals,
                        color=color,
                        lw=1,
                        alpha=1 - 0.6 * i / max(len(keys), 1),
                        label=f"{run.name} {key[len(prefix) + len(family) :].strip('/') or family}",
                    )
        ax.set(xlabel="step", title=f"{prefix}{family}")
        if family in LOG_FAMILIES:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        paths.append(save_figure(fig, out / f"diag_{family}.png"))
    return paths


# ---------------------------------------------------------------------------------------------
# The report


COLUMNS = [
    "run",
    "precision",
    "ended",
    "steps",
    "final eval loss",
    "best eval loss",
    "final train loss",
    "spikes",
    "spike kinds",
    "rollbacks",
    "overflow steps",
    "longest overflow run",
    "steps at min scale",
    "first overflow",
    "spike score loss",
    "spike score grad",
    "tokens/s",
]


def write_report(paths: list[str | Path], out: str | Path | None = None) -> tuple[Path, list[str]]:
    """Plots, ``report.md`` and ``report.html`` for the runs; returns the folder and notes."""
    runs = [load_run(p) for p in paths]
    out = Path(out) if out else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    lengths = {r.name: summarize(r)["steps"] for r in runs}
    if len(set(lengths.values())) > 1:
        notes.append(
            "The runs differ in length ("
            + ", ".join(f"{k}: {v} steps" for k, v in lengths.items())
            + "); each is plotted as far as it got and the difference covers the common steps."
        )
    plots = [
        plot_overview(runs, out),
        plot_losses(runs, out),
        plot_grad_norm(runs, out),
        plot_loss_scale(runs, out),
    ]
    if len(runs) >= 2:
        plots.append(plot_loss_difference(runs[0], runs[1], out))
    plots += plot_diagnostics(runs, out)
    plots = [p for p in plots if p is not None]
    rows = [summarize(r) for r in runs]
    story = [describe(r, row) for r, row in zip(runs, rows)]
    overflows = overflow_section(runs, out)
    guide = _guide_link(out)
    labels = [run_label(r.config) for r in runs]  # the spike scores' windows, in their headers or cells
    shown = name_scores(COLUMNS, rows, labels, ("spike score loss", "spike score grad"))
    (out / "report.md").write_text(_markdown(shown, story, notes, plots, guide, overflows))
    (out / "report.html").write_text(_html(shown, story, notes, plots, guide, overflows))
    return out, notes


def overflow_section(runs: list[RunData], out: Path) -> tuple[list[dict], Path | None] | None:
    """The overflow table and the headroom plot (:mod:`dsinstab.reports.overflow_report`), where any run
    overflowed or ran the ``headroom`` probe; ``None`` otherwise."""
    plot = overflow_report.headroom_plot(runs, out)
    if plot is None and not any(overflow_report.overflow_events(r) for r in runs):
        return None
    return overflow_report.overflow_table(runs), plot


def describe(run: RunData, row: dict) -> str:
    """One sentence on how the run went, from its numbers."""
    text = f"{run.label}: {row['ended']} after {row['steps']} steps"
    if row["overflow steps"]:
        text += (
            f"; {row['overflow steps']} overflow-skipped steps, the first at step {row['first overflow']}, "
            f"the longest run {row['longest overflow run']} in a row"
        )
        _, scale = run.series("train/loss_scale")
        if scale:
            text += f"; the loss scale went from {scale[0]:g} to {scale[-1]:g}"
    if run.status.get("state") == "min_loss_scale":
        text += f"; DeepSpeed gave up at step {run.end_step}"
    if row["spikes"]:
        text += f"; {row['spikes']} spike(s): {row['spike kinds']}"
    if row["final eval loss"] is not None:
        text += f"; final eval loss {fmt(row['final eval loss'])}"
    return text + "."


def _guide_link(out: Path) -> str:
    """docs/reading-the-report.md as seen from the report folder: relative inside the checkout (the
    link survives moving the checkout), else its absolute path."""
    if not GUIDE.exists():
        return GUIDE.name
    out = out.resolve()
    return os.path.relpath(GUIDE, out) if out.is_relative_to(ROOT) else str(GUIDE)


OVERFLOW_INTRO = (
    "Where each run's overflows started (first non-finite tensor in execution order) and how close "
    "each layer ran to fp16's largest value: see docs/overflow-anatomy.md."
)


def _markdown(table, story, notes, plots, guide, overflows) -> str:
    lines = ["# dsinstab comparison", "", f"How to read this report: [{GUIDE.name}]({guide})", ""]
    lines += [f"- {s}" for s in story] + [""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += [markdown_table(*table)]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    if overflows:
        table, plot = overflows
        lines += [
            "",
            "## Overflows",
            "",
            OVERFLOW_INTRO,
            "",
            markdown_table(overflow_report.OVERFLOW_COLUMNS, table, 3),
        ]
        lines += [f"![{plot.stem}]({plot.name})"] if plot else []
    return "\n".join(lines) + "\n"


def _html(table, story, notes, plots, guide, overflows) -> str:
    items = "".join(f"<li>{html.escape(s)}</li>" for s in story)
    warn = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
    body = (
        f'<p>How to read this report: <a href="{html.escape(guide)}">{GUIDE.name}</a></p><ul>{items}</ul>{warn}'
        + html_table(*table)
        + "".join(html_figure(p) for p in plots)
    )
    if overflows:
        table, plot = overflows
        body += f"<h2>Overflows</h2><p>{html.escape(OVERFLOW_INTRO)}</p>"
        body += html_table(overflow_report.OVERFLOW_COLUMNS, table, 3) + (html_figure(plot) if plot else "")
    return html_page("dsinstab comparison", body)


def report_command(paths: list[str | Path], out: str | Path | None) -> Path | None:
    """What the scripts do: write the report, print its notes and where it is; on bad input print
    the one-sentence error and return ``None`` (the scripts exit 2)."""
    try:
        folder, notes = write_report(paths, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    for note in notes:
        print(f"note: {note}")
    print(f"report: {folder / 'report.html'} (and report.md, *.png)")
    return folder


# ---------------------------------------------------------------------------------------------
# The end of a run


def run_summary(run_dir: str | Path) -> str:
    """What ``scripts/train.py`` prints when a run ends: how it ended, its final eval loss, the
    events and checkpoints it wrote, where it is, and the command that makes its report."""
    from dsinstab.run.checkpoint import (  # here: it imports deepspeed, which compare.py needs not
        MARKER,
        tag_step,
    )

    run_dir = Path(run_dir)
    status = _read_json(run_dir / "status.json")
    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    state, step = status.get("state"), status.get("step")
    ended = {
        "min_loss_scale": "died at the minimum loss scale: DeepSpeed gave up at step "
        + str(next((e["step"] for e in events if e.get("kind") == "loss_scale_minimum"), "?"))
        + f", the last step applied is {step}",
        "interrupted": f"was interrupted at step {step}; --resume latest continues it",
    }.get(state, f"{ending(state, 'ended in an unknown state')} at step {step}")
    if status.get("message"):
        ended += f" ({status['message']})"
    evals = [(r["step"], r["eval/loss"]) for r in metrics if "eval/loss" in r]
    eval_line = "none logged"
    if evals:
        eval_line = f"{fmt(evals[-1][1])} at step {evals[-1][0]} ({fmt(evals[0][1])} at step {evals[0][0]})"
    happened = [(e["step"], f["kind"]) for e in events for f in e.get("firings") or [e]]
    ckpts = run_dir / "checkpoints"
    tags = sorted((p.name for p in ckpts.glob("*") if (p / MARKER).exists()), key=lambda t: (tag_step(t), t))
    latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else None
    tags = [f"{t} (latest)" if t == latest else t for t in tags]
    shown = _shown(run_dir)
    return "\n".join(
        [
            f"== the run {ended} (exit code {status.get('exit_code')})",
            f"   final eval loss: {eval_line}",
            f"   events ({shown}/events.jsonl): {spike_kinds(happened) or 'none'}",
            f"   checkpoints ({shown}/checkpoints): {', '.join(tags) or 'none'}",
            f"   run directory: {shown}",
            f"   its report: python {_shown(ROOT / 'scripts' / 'compare.py')} {shown}"
            f"  -> {shown}/report/report.html",
        ]
    )


def _read_json(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _shown(path: Path) -> str:
    """A path as a user would type it here: relative to the working directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
