"""How every dsinstab report is written: numbers, tables, figures and the self-contained page.

The comparison report, the overflow section, replays and sweeps all render through here, so a
table or a figure looks the same in each and ``report.html`` is one file (plots embedded) that
can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

STYLE = (  # after the body's rule, whose max-width is the page's
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
    "th{background:#f3f3f3}img{max-width:100%}.note{background:#fff6d6;padding:.5em}"
)


def fmt(v, digits: int = 4) -> str:
    """A table cell: ``-`` for nothing, floats to ``digits`` significant digits, inf/nan spelled."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
    return str(v)


def number(v) -> float | None:
    """A logged value as a float: events keep non-finite values as the strings "inf"/"nan"."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def markdown_table(columns: list[str], rows: list[dict], digits: int = 4, cell=fmt) -> str:
    """``cell(value, digits)`` writes each cell (:func:`fmt` unless a report has its own)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(columns: list[str], rows: list[dict], digits: int = 4, cell=fmt) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(r.get(c), digits))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def html_figure(path: Path) -> str:
    """A PNG embedded in the page (base64), captioned with its file name."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}"><figcaption>{path.stem}</figcaption></figure>'


def html_page(title: str, body: str, width: int = 1100) -> str:
    """The self-contained page: ``title`` as its heading, ``body`` below, at most ``width`` pixels wide."""
    style = f"body{{font-family:system-ui,sans-serif;margin:2em;max-width:{width}px}}{STYLE}"
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mark_top_edge(ax, x: float, **style) -> None:
    """A marker on the top edge of the axes at ``x``: where a value is inf or nan and has no place
    on the y axis."""
    ax.plot([x], [1.0], transform=ax.get_xaxis_transform(), clip_on=False, **style)
