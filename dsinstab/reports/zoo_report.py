"""The zoo's scoreboard: which mitigation fixes which instability, with intervals over seeds.

For each case and variant: how many seeds were unstable by the case's own definition (k/n), and the
median final eval loss over seeds with a distribution-free interval for the median (order
statistics: the widest pair of ranks whose binomial coverage reaches 95%, or [min, max] when no pair
does: with n seeds that covers 1 - 2·0.5^n, 75% for 3 and 94% for 5, printed beside it). For the
stable reference case, the cost of each mitigation: the per-seed difference of its final eval loss
from the baseline's (the same seed on both sides), with the same interval. Per case, the loss curves
of the baseline and its fixes across seeds. Written as ``OUT/scoreboard.md``, a self-contained
``scoreboard.html`` and ``scoreboard.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsinstab.experiments.zoo import Case, Zoo, final_eval, read_run
from dsinstab.reports.render import html_figure, html_page, html_table, markdown_table, plt, save_figure
from dsinstab.reports.run_data import COLORS
from dsinstab.reports.stats import LEVEL, median_interval
from dsinstab.run.status import outcome
from dsinstab.run.tracking import json_safe, read_jsonl


@dataclass
class SeedResult:
    seed: int
    ran: bool  # ended with a result (finished, died at the minimum scale, stopped by a detector)
    unstable: bool
    why: list[str]
    final_eval: float | None  # the last eval loss of a finished run; None otherwise
    state: str | None


@dataclass
class Cell:
    case: str
    variant: str
    seeds: list[SeedResult] = field(default_factory=list)

    @property
    def ran(self) -> list[SeedResult]:
        return [s for s in self.seeds if s.ran]

    @property
    def unstable(self) -> int:
        return sum(s.unstable for s in self.ran)

    @property
    def not_ended(self) -> list[SeedResult]:
        """Seeds that ran but ended without a result (failed, interrupted, a checkpoint failed)."""
        return [s for s in self.seeds if not s.ran and s.state is not None]

    def final_evals(self) -> list[float]:
        """Each seed's final eval loss; a run that did not finish (or ended non-finite) is +inf."""
        out = []
        for s in self.ran:
            v = s.final_eval
            out.append(v if v is not None and math.isfinite(v) else math.inf)
        return out


def run_dir(case: Case, variant: str, seed: int) -> Path:
    point = next(p for p in case.grid.points if p.variant == variant and p.seed == seed)
    return point.run_dir


def seed_result(case: Case, variant: str, seed: int) -> SeedResult:
    status, rows, events = read_run(run_dir(case, variant, seed))  # each file read once
    if outcome(status) is None:  # not run, still running, failed or interrupted: no result to score
        return SeedResult(seed, False, False, [], None, status.get("state"))
    unstable, why = case.criteria.verdict(status, rows, events)
    return SeedResult(seed, True, unstable, why, final_eval(status, rows), status.get("state"))


def cells(zoo: Zoo) -> list[Cell]:
    out = []
    for case in zoo.cases:
        for variant in case.variants:
            out.append(Cell(case.name, variant, [seed_result(case, variant, s) for s in case.grid.seeds]))
    return out


def cell_text(cell: Cell) -> str:
    """``k/n · median [low, high] (coverage)``, and the seeds that ended without a result."""
    failed = f" (+{len(cell.not_ended)} without a result)" if cell.not_ended else ""
    if not cell.ran:
        return ("not run" if not cell.not_ended else "no result") + failed
    med, lo, hi, cov = median_interval(cell.final_evals())
    return f"{cell.unstable}/{len(cell.ran)} · {_num(med)} [{_num(lo)}, {_num(hi)}] ({cov:.0%}){failed}"


def costs(zoo: Zoo, by_key: dict) -> list[dict]:
    """Per variant of the reference case: final eval loss minus the baseline's, seed by seed."""
    rows = []
    for case in (c for c in zoo.cases if c.reference):
        base = {s.seed: s for s in by_key[(case.name, "baseline")].ran}
        for variant in case.variants:
            if variant == "baseline":
                continue
            diffs = []  # a seed where the variant did not finish costs +inf: it lost the run
            for s in by_key[(case.name, variant)].ran:
                b = base.get(s.seed)
                if b is not None and b.final_eval is not None:
                    diffs.append(s.final_eval - b.final_eval if s.final_eval is not None else math.inf)
            med, lo, hi, cov = median_interval(diffs)
            rows.append({"case": case.name, "variant": variant, "seeds": len(diffs), "median Δ eval loss": med,
                         "low": lo, "high": hi, "coverage": cov if diffs else None})  # fmt: skip
    return rows


def plot_case(case: Case, by_key: dict, out: Path) -> Path:
    """The train loss of the baseline and each fix, one thin line per seed."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, variant in enumerate(["baseline", *case.fixes]):
        for j, s in enumerate(by_key[(case.name, variant)].ran):
            d = run_dir(case, variant, s.seed)
            rows = [r for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]
            xs = [r["step"] for r in rows]
            ys = [r["train/loss"] if math.isfinite(r["train/loss"]) else math.nan for r in rows]
            ax.plot(
                xs, ys, color=COLORS[i % len(COLORS)], lw=0.9, alpha=0.8, label=variant if j == 0 else None
            )
    ax.set(xlabel="step", ylabel="train loss", title=f"{case.name}: baseline and fix, every seed")
    ax.legend(fontsize=8)
    return save_figure(fig, out / f"{case.name}.png")


def write_scoreboard(zoo: Zoo) -> Path:
    out = zoo.out
    out.mkdir(parents=True, exist_ok=True)
    all_cells = cells(zoo)
    by_key = {(c.case, c.variant): c for c in all_cells}
    variants = list(dict.fromkeys(v for case in zoo.cases for v in case.variants))
    table = []
    for case in zoo.cases:
        row = {"case": case.name, "instability": case.instability}
        for v in variants:
            row[v] = cell_text(by_key[(case.name, v)]) if (case.name, v) in by_key else ""
        table.append(row)
    cost_rows = costs(zoo, by_key)
    plots = [plot_case(case, by_key, out) for case in zoo.cases if by_key[(case.name, "baseline")].ran]
    columns = ["case", "instability", *variants]
    cost_cols = ["case", "variant", "seeds", "median Δ eval loss", "low", "high", "coverage"]
    intro = (
        "Each cell: unstable seeds k/n by the case's own definition · median final eval loss over seeds "
        "[interval for the median] (its coverage: with n seeds the range covers 1 - 2·0.5^n). A run that "
        "died counts as +inf; a seed that ended without a result (failed, interrupted) is left out and named."
    )
    definitions = [
        f"- **{c.name}**: unstable when {describe(c)}; fixes: {', '.join(c.fixes) or '-'}" for c in zoo.cases
    ]
    md = ["# Instability zoo scoreboard", "", intro, "", markdown_table(columns, table, cell=_cell), "",
          "## What unstable means, per case", "", *definitions, ""]  # fmt: skip
    if cost_rows:
        md += ["## Cost on the stable reference case (variant minus baseline, same seed)", "",
               markdown_table(cost_cols, cost_rows), ""]  # fmt: skip
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "scoreboard.md").write_text("\n".join(md) + "\n")
    body = f"<p>{intro}</p>" + html_table(columns, table, cell=_cell)
    body += (
        "<h2>What unstable means, per case</h2><ul>"
        + "".join(f"<li>{d[2:]}</li>" for d in definitions)
        + "</ul>"
    )
    if cost_rows:
        body += "<h2>Cost on the stable reference case</h2>" + html_table(cost_cols, cost_rows)
    body += "".join(html_figure(p) for p in plots)
    (out / "scoreboard.html").write_text(html_page("Instability zoo scoreboard", body, width=1400))
    data = {
        "level": LEVEL,
        "cells": [cell_record(c) for c in all_cells],
        "costs": cost_rows,
        "criteria": {c.name: asdict(c.criteria) for c in zoo.cases},
        "fixes": {c.name: c.fixes for c in zoo.cases},
    }
    (out / "scoreboard.json").write_text(json.dumps(json_safe(data), indent=1))
    return out


def cell_record(cell: Cell) -> dict:
    """A cell of scoreboard.json: its counts, the median with its interval, and every seed."""
    med, lo, hi, cov = median_interval(cell.final_evals())
    return {
        "case": cell.case,
        "variant": cell.variant,
        "unstable": cell.unstable,
        "ran": len(cell.ran),
        "median_final_eval": med,
        "interval": [lo, hi],
        "coverage": cov,
        "seeds": [asdict(s) for s in cell.seeds],
    }


def describe(case: Case) -> str:
    c, parts = case.criteria, []
    if c.died:
        parts.append(f"the run ends {' or '.join(c.died)}")
    if c.final_eval_above_start is not None:
        parts.append(f"its final eval loss is above step 0's minus {c.final_eval_above_start:g}")
    if c.final_eval_above is not None:
        parts.append(f"its final eval loss is above {c.final_eval_above:g}")
    if c.events:
        parts.append(f"an event {' or '.join(c.events)} is recorded")
    parts += [f"{k} exceeds {v:g}" for k, v in c.metric_above.items()]
    return " or ".join(parts) + " (or its final eval loss is not finite)"


def _num(v) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.3f}"


def _cell(v, digits: int = 4) -> str:
    return v if isinstance(v, str) else _num(v)
