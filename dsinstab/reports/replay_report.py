"""The replay's report: every branch against the original, a row of recovery numbers per branch,
one sentence on what saved the run, and what moved first in the plain replay.

The numbers judge each branch against the band of the spike detector at the spike: the baseline
(the rolling median) and the threshold of the ``loss_spike`` firing that RUN's events.jsonl
recorded at ``--at``, or, without one, the same rule applied to RUN's losses before it. The loss is
``train/ce_loss`` where a run has z-loss on (so a z-loss branch is judged on the same quantity as
the others), ``train/loss`` otherwise.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsinstab.reports import forensics  # noqa: E402
from dsinstab.reports.render import html_figure, html_page, html_table, markdown_table, save_figure  # noqa: E402
from dsinstab.reports.run_data import COLORS, RunData, ending, load_run  # noqa: E402
from dsinstab.run.config import ConfigError  # noqa: E402
from dsinstab.run.tracking import json_safe  # noqa: E402

COLUMNS = [
    "branch",
    "intervention",
    "ended",
    "spike recurred",
    "peak loss / baseline",
    "steps until back in band",
    "excess-loss area",
    "loss at end",
    "eval loss at end",
]


COMPARED = ("train/loss", "train/grad_norm", "train/loss_scale")


def exactness(original: list[dict], replay: list[dict], first: int, last: int) -> tuple[bool, str]:
    """Whether the replay logged RUN's values at steps ``first..last``, and the line that says so."""
    a = {r["step"]: r for r in original if "train/loss" in r and first <= r["step"] <= last}
    b = {r["step"]: r for r in replay if "train/loss" in r and first <= r["step"] <= last}
    common = sorted(set(a) & set(b))
    if not common:
        return False, f"replay NOT checked: RUN and the plain replay share no logged step in {first}..{last}"
    worst: dict[str, tuple[float, int]] = {}
    for step in common:
        for key in COMPARED:
            if key in a[step] or key in b[step]:
                x, y = a[step].get(key, math.nan), b[step].get(key, math.nan)
                d = 0.0 if x == y or (math.isnan(x) and math.isnan(y)) else abs(x - y)
                d = d if math.isfinite(d) else math.inf
                if d > worst.get(key, (-1.0, 0))[0]:
                    worst[key] = (d, step)
    through = common[-1]
    loss_d, loss_at = worst.get("train/loss", (0.0, through))
    if all(d == 0 for d, _ in worst.values()) and len(common) == len(a):
        return True, f"replay exact through step {through} (max |\u0394loss| = 0)"
    others = ", ".join(
        f"max |\u0394{k[6:]}| = {d:.3g} at step {s}" for k, (d, s) in worst.items() if d and k != "train/loss"
    )
    missing = (
        f"; {len(a) - len(common)} of RUN's steps not logged by the replay" if len(common) < len(a) else ""
    )
    return False, (
        f"replay NOT exact through step {through}: max |\u0394loss| = {loss_d:.3g} at step {loss_at}"
        + (f", {others}" if others else "")
        + missing
    )


def loss_series(run: RunData) -> dict[int, float]:
    key = "train/ce_loss" if run.series("train/ce_loss")[0] else "train/loss"
    return dict(zip(*run.series(key)))


def detector_band(original: RunData, at: int) -> tuple[float, float, str]:
    """(baseline, threshold, where they come from) of the loss band at the spike."""
    for e in original.events:
        if e.get("step") == at:
            for f in e.get("firings", []):
                if f.get("kind") == "loss_spike" and f.get("baseline") is not None:
                    return float(f["baseline"]), float(f["threshold"]), f"the loss_spike event at step {at}"
    sp = original.config.get("trainer", {}).get("spikes", {})
    losses = loss_series(original)
    before = [v for s, v in sorted(losses.items()) if s < at and math.isfinite(v)][-sp.get("window", 100) :]
    if len(before) < 3:
        raise ConfigError(f"--at {at}: RUN logged too few finite losses before it to judge a spike.")
    base = statistics.median(before)
    mad = statistics.median(abs(v - base) for v in before)
    threshold = max(base + sp.get("loss_k", 8.0) * 1.4826 * mad, base * (1 + sp.get("min_rel_jump", 0.1)))
    return base, threshold, f"the detector's rule on RUN's {len(before)} losses before step {at}"


def recovery(run: RunData, start: int, end: int, baseline: float, threshold: float) -> dict:
    """A branch's row: did the loss cross the threshold in ``start..end``, how high, for how long."""
    losses = {s: v for s, v in loss_series(run).items() if start <= s <= end}
    if not losses:
        return {"spike recurred": "no steps"}
    steps = sorted(losses)
    over = [s for s in steps if not losses[s] <= threshold]  # a nan loss counts as over
    back = None
    if over:
        back = next((s - over[0] for s in steps if s > over[0] and losses[s] <= threshold), None)
    peak = max(losses.values(), key=lambda v: v if math.isfinite(v) else math.inf)
    area = sum(max(0.0, v - baseline) if math.isfinite(v) else math.inf for v in losses.values())
    evals = dict(zip(*run.series("eval/loss")))
    return {
        "spike recurred": f"yes (step {over[0]})" if over else "no",
        "peak loss / baseline": peak / baseline,
        "steps until back in band": 0
        if not over
        else (back if back is not None else f"not by step {steps[-1]}"),
        "excess-loss area": area,
        "loss at end": losses[steps[-1]] if steps[-1] == end else None,
        "eval loss at end": evals.get(end),
        "_recurred": bool(over),
        "_area": area,
    }


def plot_branches(
    original: RunData, branches: list[RunData], key: str, lo: int, hi: int, out: Path, band=None
) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps, vals = original.series(key)
    pts = [(s, v) for s, v in zip(steps, vals) if lo <= s <= hi]
    ax.plot(
        [s for s, _ in pts],
        [v for _, v in pts],
        color="black",
        lw=2.5,
        alpha=0.5,
        label=f"{original.name} (original)",
    )
    for i, run in enumerate(branches):
        s, v = run.series(key)
        ax.plot(
            s, v, color=COLORS[i % len(COLORS)], lw=1.2, ls="-" if i < len(COLORS) else "--", label=run.name
        )
    if band:
        base, threshold = band
        ax.axhline(base, color="gray", ls=":", lw=1, label="pre-spike baseline")
        ax.axhline(threshold, color="gray", ls="--", lw=1, label="detector threshold")
    if key == "train/grad_norm":
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=key, title=f"{key}: every branch over the original")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / f"{key.split('/')[-1]}.png")


def verdict(rows: list[dict]) -> str:
    """The sentence: least excess loss, and whether skip/reshuffle removed what the plain replay kept."""
    judged = [r for r in rows if "_area" in r]
    if not judged:
        return "No branch logged a step in the window."
    best = min(judged, key=lambda r: r["_area"])
    plain = next((r for r in judged if r["branch"] == "plain"), None)
    text = f"Least excess loss: {best['branch']} ({best['excess-loss area']:.3g}"
    text += f"; plain replay {plain['excess-loss area']:.3g})" if plain and best is not plain else ")"
    if plain is None:
        return text + "."
    text += f"; the plain replay {'kept the spike' if plain['_recurred'] else 'did not spike'}"
    for kind in ("skip", "reshuffle"):
        some = [r for r in judged if r["branch"] == kind or r["branch"].startswith(kind + "-")]
        if some:
            removed = sum(not r["_recurred"] for r in some)
            if len(some) > 1:
                text += f", {kind} removed it in {removed} of {len(some)}"
            else:
                text += f", {some[0]['branch']} {'removed it' if removed else 'kept it'}"
    return text + "."


def write_replay_report(
    source, plans, codes: dict, out: Path, window: int, k: float, exact_line: str
) -> tuple[Path, str]:
    """report.md, report.html and the plots in ``OUT/report``; returns the folder and the verdict."""
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    original = load_run(source.path)
    at, end, start = source.at, source.at + window, source.tag_step + 1
    baseline, threshold, band_from = detector_band(original, at)
    branches, rows = [], []
    orig_row = {
        "branch": "original",
        "intervention": "RUN as it ran",
        "ended": ending(original.status.get("state"), "-"),
    }
    rows.append(orig_row | recovery(original, start, end, baseline, threshold))
    for plan in plans:
        row = {"branch": plan.name, "intervention": plan.spec}
        try:
            run = load_run(out / plan.name)
        except ConfigError:
            rows.append(row | {"ended": f"failed (exit {codes.get(plan.name)}; see {plan.name}.log)"})
            continue
        branches.append(run)
        rows.append(
            row
            | {"ended": ending(run.status.get("state"), "-")}
            | recovery(run, start, end, baseline, threshold)
        )
    sentence = verdict(rows[1:])
    lo = max(1, start - (at - start) - 1)
    plots = [
        plot_branches(original, branches, "train/loss", lo, end, folder, (baseline, threshold)),
        plot_branches(original, branches, "train/grad_norm", lo, end, folder),
    ]
    first = ""
    plain = next((b for b in branches if b.name == "plain"), None)
    table: list[dict] = []
    if plain is not None:
        try:
            tl = forensics.timeline(plain.metrics, at, k=k)
            plots.append(
                forensics.heatmap(tl, folder / "what_moved_first.png", "What moved first (plain replay)")
            )
            first, table = tl.sentence(), tl.table
        except ConfigError as e:
            first = f"What moved first: not judged ({e})"
    intro = (
        f"Replay of {source.path} from {source.tag} (step {source.tag_step}) through step {end}, spike at step {at}; "
        f"band from {band_from}: baseline {baseline:.4g}, threshold {threshold:.4g}."
    )
    md = [
        "# dsinstab replay",
        "",
        f"**{exact_line}**",
        "",
        intro,
        "",
        sentence,
        "",
        markdown_table(COLUMNS, rows, 4),
    ]
    md += [f"![{p.stem}]({p.name})" for p in plots[:2]]
    md += [
        "",
        "## What moved first (plain replay)",
        "",
        first,
        "",
        markdown_table(forensics.COLUMNS, table, 3),
    ]
    md += [f"![{p.stem}]({p.name})" for p in plots[2:]]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    body = f"<p><b>{html.escape(exact_line)}</b></p><p>{html.escape(intro)}</p><p>{html.escape(sentence)}</p>"
    body += html_table(COLUMNS, rows, 4) + "".join(html_figure(p) for p in plots[:2])
    body += f"<h2>What moved first (plain replay)</h2><p>{html.escape(first)}</p>" + html_table(
        forensics.COLUMNS, table, 3
    )
    body += "".join(html_figure(p) for p in plots[2:])
    (folder / "report.html").write_text(html_page("dsinstab replay", body))
    summary = {
        "exact": exact_line,
        "verdict": sentence,
        "band": {"baseline": baseline, "threshold": threshold, "from": band_from},
        "branches": [
            {k: v for k, v in r.items() if not k.startswith("_")} | {"recurred": r.get("_recurred")}
            for r in rows
        ],
        "first_moved": table,
    }
    (folder / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    return folder, sentence
