"""The instability zoo: each named instability reproduced across seeds, and what fixes it.

A case (``configs/zoo/<name>.yaml``) is a grid of the sweep's kind (one or more learning rates, the
seeds, its variants) plus what the zoo needs: the instability it reproduces, the definition of
"unstable" it owns (:class:`Criteria`), its documented fixes, the mitigations that apply to it and
its ``quick`` setting. The mitigations themselves (``configs/zoo/mitigations.yaml``) are variants
any case may take. Every run is an ordinary run directory ``OUT/<case>/<variant>-lr<lr>-s<seed>``,
run by the sweep's machinery (:mod:`dsinstab.experiments.sweep`): locally N at a time, resumable,
or emitted for a scheduler. The scoreboard is :mod:`dsinstab.reports.zoo_report`.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dsinstab.experiments.sweep import GRID_KEYS, NAME_RE, Grid, grid_from
from dsinstab.run.config import ConfigError, _read_yaml, _suggest
from dsinstab.run.resolve import ROOT
from dsinstab.run.status import RunEnd, read_status
from dsinstab.run.tracking import read_jsonl

ZOO = ROOT / "configs" / "zoo"
MITIGATIONS_FILE = "mitigations.yaml"
SHAPES_FILE = "shapes.yaml"
NOT_CASES = (MITIGATIONS_FILE, SHAPES_FILE)
CASE_KEYS = ("instability", "unstable", "fixes", "mitigations", "quick", "reference", "shapes")
QUICK_KEYS = ("set", "seeds", "variants")
SHAPE_KEYS = ("preset", "set")  # what a shape of shapes.yaml gives every case
AT_SHAPE_KEYS = ("lrs", "set", "unstable", "variants")  # what a case may change at a shape
DEFAULT_SHAPE = "tiny"  # the shape the cases were measured at (2 CPU cores); --quick is its setting
CRITERIA_KEYS = ("died", "final_eval_above_start", "final_eval_above", "events", "metric_above")
QUICK_SEEDS = 3


@dataclass
class Criteria:
    """What makes one seed's run unstable, as its case defines it: any of these."""

    died: list[str] = field(default_factory=list)  # run-end states, e.g. min_loss_scale
    final_eval_above_start: float | None = None  # final eval loss > eval loss at step 0 minus this
    final_eval_above: float | None = None  # final eval loss above this bound
    events: list[str] = field(default_factory=list)  # an event (or firing) of one of these kinds
    metric_above: dict[str, float] = field(default_factory=dict)  # a metric (prefix) past its bound

    def judge(self, run_dir: Path) -> tuple[bool, list[str]]:
        """Whether the run in ``run_dir`` is unstable, and why (each reason one short phrase)."""
        return self.verdict(*read_run(run_dir))

    def verdict(self, status: dict, rows: list[dict], events: list[dict]) -> tuple[bool, list[str]]:
        """:meth:`judge` on a run already read (:func:`read_run`)."""
        evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
        why = []
        state = status.get("state")
        if state in self.died:
            why.append(
                f"{RunEnd.of(state).words if RunEnd.of(state) else state} at step {status.get('step')}"
            )
        final = final_eval(status, rows)
        if final is not None and not math.isfinite(final):
            why.append("non-finite final eval loss")
        if final is not None and self.final_eval_above_start is not None and evals:
            if final > evals[0] - self.final_eval_above_start:
                why.append(
                    f"final eval loss {final:.3f} > {evals[0]:.3f} (step 0) - {self.final_eval_above_start:g}"
                )
        if final is not None and self.final_eval_above is not None and final > self.final_eval_above:
            why.append(f"final eval loss {final:.3f} > {self.final_eval_above:g}")
        if self.events:
            for e in events:
                kinds = {e.get("kind")} | {f.get("kind") for f in e.get("firings", [])}
                hit = sorted(k for k in kinds if k in self.events)
                if hit:
                    why.append(f"{hit[0]} at step {e.get('step')}")
                    break
        for prefix, bound in self.metric_above.items():
            seen = [
                v for r in rows for k, v in r.items() if k.startswith(prefix) and isinstance(v, (int, float))
            ]
            top = max(seen, key=lambda v: math.inf if math.isnan(v) else v, default=None)
            if top is not None and not top <= bound:
                why.append(f"{prefix} reached {top:.4g} > {bound:g}")
        return bool(why), why


def read_run(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """A run directory's status, metrics and events, each empty where its file is missing."""
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    return read_status(run_dir), rows, events


def final_eval(status: dict, rows: list[dict]) -> float | None:
    """The last eval loss of a finished run; ``None`` for a run that did not finish."""
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    return evals[-1] if evals and status.get("state") == RunEnd.finished.name else None


@dataclass
class Case:
    name: str
    path: Path
    instability: str
    criteria: Criteria
    fixes: list[str]
    reference: bool  # the stable case every mitigation's cost is measured on
    grid: Grid

    @property
    def variants(self) -> list[str]:
        return self.grid.variants


@dataclass
class Zoo:
    out: Path
    cases: list[Case]
    grid: Grid  # every case's points, named <case>/<point>, for the sweep's runner


def mitigation_variants(folder: Path) -> dict:
    path = folder / MITIGATIONS_FILE
    raw = _read_yaml(path) if path.exists() else {}
    variants = raw.get("variants", {}) if isinstance(raw, dict) else {}
    if not isinstance(variants, dict):
        raise ConfigError(f"{path}: variants must map each mitigation's name to its set/ds_config/preset.")
    return variants


def shapes(folder: Path) -> dict[str, dict]:
    """``shapes.yaml``: the model and data every case trains, by name (its preset and overrides)."""
    path = folder / SHAPES_FILE
    raw = _read_yaml(path) if path.exists() else {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"{path}: each shape must map to its {' and '.join(SHAPE_KEYS)}.")
    for name, spec in raw.items():
        bad = [k for k in spec if k not in SHAPE_KEYS]
        if bad:
            raise ConfigError(
                f"{path}: shape {name} has unknown key {bad[0]}; allowed: {', '.join(SHAPE_KEYS)}."
            )
    return raw or {DEFAULT_SHAPE: {}}


def at_shape(raw: dict, path: Path, shape: str) -> dict:
    """A case's own changes at ``shape`` (``shapes: {<shape>: {lrs, set, unstable, variants}}``)."""
    at = (raw.get("shapes") or {}).get(shape) or {}
    bad = [k for k in at if k not in AT_SHAPE_KEYS]
    if not isinstance(at, dict) or bad:
        raise ConfigError(
            f"{path}: shapes.{shape} may set only {', '.join(AT_SHAPE_KEYS)}"
            + (f", not {bad[0]}." if bad else ".")
        )
    return at


def _criteria(raw, path: Path) -> Criteria:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{path}: unstable must map at least one of {', '.join(CRITERIA_KEYS)} to its value."
        )
    for key in raw:
        if key not in CRITERIA_KEYS:
            raise ConfigError(
                f"{path}: unstable has unknown key {key}{_suggest(str(key), list(CRITERIA_KEYS))}; "
                f"allowed: {', '.join(CRITERIA_KEYS)}."
            )
    died = raw.get("died", [])
    died = [died] if isinstance(died, str) else list(died)
    unknown = [d for d in died if RunEnd.of(d) is None]
    if unknown:
        raise ConfigError(
            f"{path}: unstable.died has unknown state {unknown[0]!r}; allowed: {', '.join(RunEnd.__members__)}."
        )
    events = raw.get("events", [])
    return Criteria(
        died=died,
        final_eval_above_start=raw.get("final_eval_above_start"),
        final_eval_above=raw.get("final_eval_above"),
        events=[events] if isinstance(events, str) else list(events),
        metric_above=dict(raw.get("metric_above", {})),
    )


def load_case(
    path: Path,
    out: Path,
    quick: bool,
    seeds: int | None,
    only_variants: list[str] | None,
    mitigations: dict,
    shape: tuple[str, dict] = (DEFAULT_SHAPE, {}),
) -> Case:
    """One case at ``shape`` (its name and spec): its grid resolved (every point checked as
    train.py checks it), nothing written. The overrides apply in this order, the last winning: the
    shape's, the case's, the case's own at that shape, the quick setting's, the variant's."""
    raw = _read_yaml(path)
    for key in raw:
        if key not in GRID_KEYS + CASE_KEYS:
            allowed = list(GRID_KEYS + CASE_KEYS)
            raise ConfigError(
                f"{path}: unknown key {key}{_suggest(str(key), allowed)}; allowed: {', '.join(allowed)}."
            )
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{path}: name must be letters, digits, '_', '.', '+' or '-', got {name!r}.")
    shape_name, shape_spec = shape
    at = at_shape(raw, path, shape_name)
    criteria = _criteria(at.get("unstable", raw.get("unstable")), path)
    fixes = list(raw.get("fixes", []))
    own = {**(raw.get("variants") or {}), **(at.get("variants") or {})}
    wanted = raw.get("mitigations", "all")
    names = list(mitigations) if wanted == "all" else list(wanted or [])
    unknown = [m for m in names if m not in mitigations and m not in own]
    if unknown:
        raise ConfigError(
            f"{path}: mitigations names {unknown[0]!r}, which configs/zoo/{MITIGATIONS_FILE} does not define."
        )
    variants = {"baseline": {}, **{m: copy.deepcopy(mitigations[m]) for m in names if m not in own}, **own}
    missing = [f for f in fixes if f not in variants]
    if missing:
        raise ConfigError(
            f"{path}: fixes names {missing[0]!r}, which is neither a mitigation nor a variant of the case."
        )
    grid_raw = {k: copy.deepcopy(v) for k, v in raw.items() if k in GRID_KEYS}
    grid_raw["name"] = name
    grid_raw["set"] = [*shape_spec.get("set", []), *grid_raw.get("set", []), *at.get("set", [])]
    grid_raw["lrs"] = at.get("lrs", grid_raw.get("lrs"))
    if shape_spec.get("preset") and "preset" not in grid_raw:
        grid_raw["preset"] = shape_spec["preset"]
    all_seeds = list(grid_raw.get("seeds", [0]))
    if quick:
        q = raw.get("quick") or {}
        bad = [k for k in q if k not in QUICK_KEYS]
        if bad:
            raise ConfigError(f"{path}: quick has unknown key {bad[0]}; allowed: {', '.join(QUICK_KEYS)}.")
        grid_raw["set"] = [*grid_raw.get("set", []), *q.get("set", [])]
        all_seeds = list(q.get("seeds", all_seeds[:QUICK_SEEDS]))
        keep = ["baseline", *fixes, *q.get("variants", [])]
        variants = {k: v for k, v in variants.items() if k in keep}
    if seeds is not None:
        all_seeds = list(range(seeds)) if seeds > len(all_seeds) else all_seeds[:seeds]
    if only_variants:
        variants = {k: v for k, v in variants.items() if k == "baseline" or k in only_variants}
    grid_raw["seeds"], grid_raw["variants"] = all_seeds, variants
    grid = grid_from(grid_raw, path, out / name)
    return Case(name, path, str(raw.get("instability", name)), criteria, [f for f in fixes if f in variants],
                bool(raw.get("reference", False)), grid)  # fmt: skip


def load_zoo(
    folder: str | Path = ZOO,
    out: str | Path = "runs/zoo",
    only: list[str] | None = None,
    quick: bool = False,
    seeds: int | None = None,
    variants: list[str] | None = None,
    shape: str = DEFAULT_SHAPE,
) -> Zoo:
    """Every case of ``folder`` (or those named in ``only``) at ``shape``, resolved; bad input
    raises ConfigError."""
    folder, out = Path(folder), Path(out)
    files = sorted(p for p in folder.glob("*.yaml") if p.name not in NOT_CASES)
    known = shapes(folder)
    if shape not in known:
        raise ConfigError(
            f"--shape: no shape {shape!r}{_suggest(shape, list(known))} in {folder / SHAPES_FILE}; "
            f"the shapes: {', '.join(known)}."
        )
    if quick and shape != DEFAULT_SHAPE:
        raise ConfigError(
            f"--quick is the {DEFAULT_SHAPE} shape's CPU setting; leave it out with --shape {shape}."
        )
    names = [p.stem for p in files]
    for name in only or []:
        if name not in names:
            raise ConfigError(
                f"--only: no case {name!r}{_suggest(name, names)}; the cases: {', '.join(names)}."
            )
    mitigations = mitigation_variants(folder)
    cases = [
        load_case(p, out, quick, seeds, variants, mitigations, (shape, known[shape]))
        for p in files
        if not only or p.stem in only
    ]
    points = []
    for case in cases:
        for p in case.grid.points:
            p = copy.copy(p)
            p.name, p.out = f"{case.name}/{p.name}", out  # the same run directory, named with its case
            points.append(p)
    rerun = [sys.executable, str(ROOT / "scripts" / "zoo.py"), "--cases", str(folder.resolve())]
    rerun += ["--out", str(out.resolve())]
    rerun += (["--quick"] if quick else []) + (["--seeds", str(seeds)] if seeds is not None else [])
    rerun += (["--only", *only] if only else []) + (["--variants", *variants] if variants else [])
    rerun += ["--shape", shape] if shape != DEFAULT_SHAPE else []
    grid = Grid(folder, "zoo", out, [], [], [], points, rerun=rerun)
    return Zoo(out, cases, grid)
