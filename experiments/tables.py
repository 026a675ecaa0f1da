"""The paper's tables filled with our runs, and the paper's claims checked on them.

Everything paper-specific (which preset fills which table, the row and column keys, the metric, the
paper's numbers, the claims and their thresholds) lives in ``reference.yaml``; this module only
knows how to group runs into cells and compare cells.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rundirs import MISSING, Run, dataset_missing

NOT_RUN = "not run"
NO_DATASET = "dataset not available"
HELD, NOT_HELD, NO_DATA = "held", "not held", "no data"


@dataclass
class Value:
    """One value of a table axis: a row or a column."""

    label: str
    match: dict[str, list] = field(default_factory=dict)  # which runs belong to it
    metric: str | None = None  # a column may read its own metric (e.g. "A error", "B error")


def axis_values(axis: dict) -> list[Value]:
    """``values: [3, 4]`` with a ``key`` is short for ``[{label: "3", match: {key: [3]}}, ...]``."""
    values = []
    for v in axis["values"]:
        if isinstance(v, dict):
            values.append(Value(label=str(v["label"]), match=v.get("match") or {}, metric=v.get("metric")))
        else:
            values.append(Value(label=str(v), match={axis["key"]: [v]}))
    return values


@dataclass
class Cell:
    runs: list[Run]
    values: list[float]  # the metric of each finished run (one per seed)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        # sample standard deviation over seeds; one seed has none
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def status(self, missing_pattern: str) -> str:
        """What to print when there is no number: the most informative state among the cell's runs."""
        if any(dataset_missing(r, missing_pattern) for r in self.runs):
            return NO_DATASET
        if any(r.status == "failed" for r in self.runs):
            return "failed"
        if any(r.status == "unfinished" for r in self.runs):
            return "unfinished"
        if any(r.status == "finished" for r in self.runs):
            return "no metric"  # finished runs that do not report this table's metric
        return NOT_RUN


class Table:
    """One table of reference.yaml with the runs that fill it."""

    def __init__(self, spec: dict, runs: list[Run]) -> None:
        self.spec = spec
        self.id: str = spec["id"]
        self.rows = axis_values(spec["rows"])
        self.columns = axis_values(spec["columns"])
        self.runs = select_runs(spec, runs)
        self.cells = {(r.label, c.label): self._cell(r, c) for r in self.rows for c in self.columns}

    def _cell(self, row: Value, column: Value) -> Cell:
        runs = [run for run in self.runs if run.matches(row.match) and run.matches(column.match)]
        metric = column.metric or row.metric or self.spec.get("metric")
        values = []
        for run in runs:
            value = run.get(metric) if run.status == "finished" and metric else MISSING
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(float(value))
        return Cell(runs=runs, values=values)

    def mean(self, row: str, column: str) -> float | None:
        cell = self.cells.get((row, column))
        return cell.mean if cell else None

    def paper(self, row: str, column: str) -> Any:
        """The paper's value for a cell (a number, a string such as "16-19", or None)."""
        values = ((self.spec.get("paper") or {}).get("values") or {}).get(row)
        labels = [c.label for c in self.columns]
        if not values or column not in labels:
            return None
        return values[labels.index(column)]

    def paper_number(self, row: str, column: str) -> float | None:
        value = self.paper(row, column)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def curve_runs(self, row: str | None = None, column: str | None = None) -> list[Run]:
        """Finished runs of a row and/or a column (for figures and curve claims)."""
        seen, out = set(), []
        for (r, c), cell in self.cells.items():
            if (row is None or r == row) and (column is None or c == column):
                for run in cell.runs:
                    if run.status == "finished" and run.path not in seen:
                        seen.add(run.path)
                        out.append(run)
        return out


def select_runs(spec: dict, runs: list[Run]) -> list[Run]:
    """The runs of a table: those matching its ``where``."""
    return [run for run in runs if run.matches(spec.get("where"))]


def fmt(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return str(value)


def cell_text(table: Table, row: str, column: str, missing_pattern: str, seeds: int) -> str:
    """ "ours (paper)": ours is the mean over seeds (± sample std when several ran) or why there is none."""
    cell = table.cells[(row, column)]
    digits = int(table.spec.get("digits", 2))
    if cell.values:
        # a mean of integer metrics (largest N) is shown with one decimal
        mean_digits = digits if len(cell.values) == 1 or digits > 0 else 1
        ours = fmt(cell.mean, mean_digits)
        if cell.std is not None:
            ours += f" ± {fmt(cell.std, mean_digits)}"
        if len(cell.values) < seeds:
            ours += f" [{len(cell.values)} of {seeds} seeds]"
    else:
        ours = cell.status(missing_pattern)
    return f"{ours} ({fmt(table.paper(row, column), digits)})"


# ---------------------------------------------------------------------------------------------
# Claims


@dataclass
class Verdict:
    verdict: str  # held | not held | no data
    detail: str


def positions(table: Table, side: dict, at: dict | None) -> list[tuple[str, str, str]]:
    """The cells of ``side`` ({row: L} or {column: L}) in order: (where, row, column)."""
    if "row" in side:
        out = [(f"{table.spec['columns']['label']}={c.label}", side["row"], c.label) for c in table.columns]
    else:
        out = [(f"{table.spec['rows']['label']}={r.label}", r.label, side["column"]) for r in table.rows]
    if at:  # restrict to one column (or row) of the other axis
        out = [p for p in out if p[2] == str(at.get("column", p[2])) and p[1] == str(at.get("row", p[1]))]
    return out


def paired(table: Table, test: dict, value: Callable[[Table, str, str], float | None]):
    """(where, a, b) at every position where both sides have a value."""
    pa = positions(table, test["a"], test.get("at"))
    pb = positions(table, test["b"], test.get("at"))
    pairs = []
    for (where, ra, ca), (_, rb, cb) in zip(pa, pb):
        a, b = value(table, ra, ca), value(table, rb, cb)
        if a is not None and b is not None:
            pairs.append((where, a, b))
    return pairs


def _positionwise(pairs, ok: Callable[[float, float], bool], what: str) -> Verdict:
    if not pairs:
        return Verdict(NO_DATA, "")
    failing = [where for where, a, b in pairs if not ok(a, b)]
    detail = f"{what} at {len(pairs) - len(failing)} of {len(pairs)}"
    if failing:
        detail += f"; not at {', '.join(failing)}"
    return Verdict(NOT_HELD if failing else HELD, detail)


def evaluate(claim: dict, tables: dict[str, Table], on_paper: bool = False) -> Verdict:
    """Check ``claim`` on our cell means, or (``on_paper``) on the paper's numbers."""
    value = paper_value if on_paper else our_value
    table = tables.get(claim["table"])
    if table is None:
        return Verdict(NO_DATA, f"no table {claim['table']!r} in reference.yaml")
    test = claim["test"]
    kind = test["kind"]
    a_name = test["a"].get("row") or test["a"].get("column")
    b_name = (test.get("b") or {}).get("row") or (test.get("b") or {}).get("column")
    if kind == "at_most":
        m = float(test["margin"])
        return _positionwise(paired(table, test, value), lambda a, b: a <= b + m, f"{a_name} ≤ {b_name} + {m:g}")
    if kind == "less":
        return _positionwise(paired(table, test, value), lambda a, b: a < b, f"{a_name} < {b_name}")
    if kind == "gap_at_least":
        m = float(test["margin"])
        return _positionwise(paired(table, test, value), lambda a, b: a - b >= m, f"{a_name} − {b_name} ≥ {m:g}")
    if kind == "ratio_at_least":
        f = float(test["factor"])
        # a > b too: when neither learned anything (0 and 0) the ratio says nothing
        return _positionwise(paired(table, test, value), lambda a, b: a >= f * b and a > b,
                             f"{a_name} ≥ {f:g} × {b_name}")
    if kind == "under":
        t = float(test["threshold"])
        points = [(w, v) for w, r, c in positions(table, test["a"], test.get("at"))
                  if (v := value(table, r, c)) is not None]
        return _positionwise([(w, v, t) for w, v in points], lambda a, b: a <= b, f"{a_name} ≤ {t:g}")
    if kind == "grows":
        points = [(w, v) for w, r, c in positions(table, test["a"], test.get("at"))
                  if (v := value(table, r, c)) is not None]
        if len(points) < 2:
            return Verdict(NO_DATA, "")
        (w0, v0), (w1, v1) = points[0], points[-1]
        return Verdict(HELD if v1 > v0 else NOT_HELD, f"{a_name}: {v0:.3g} at {w0}, {v1:.3g} at {w1}")
    if kind == "larger_gain":
        other = tables.get(test["than"])
        if other is None:
            return Verdict(NO_DATA, f"no table {test['than']!r}")
        gains = []
        for t in (table, other):
            ratios = [a / b for _, a, b in paired(t, test, value) if b]
            if not ratios:
                return Verdict(NO_DATA, "")
            gains.append(sum(ratios) / len(ratios))
        return Verdict(HELD if gains[0] > gains[1] else NOT_HELD,
                       f"mean {a_name} / {b_name}: {gains[0]:.2f} on {table.id}, {gains[1]:.2f} on {other.id}")
    if kind == "reaches_first":
        return Verdict(NO_DATA, "") if on_paper else reaches_first(table, test)
    raise ValueError(f"unknown claim kind {kind!r} in reference.yaml")


def reaches_first(table: Table, test: dict) -> Verdict:
    """At each position: does ``a``'s mean curve reach ``b``'s best value at a smaller x than ``b``?"""
    from curves import best_first, mean_curve

    lower = table.spec.get("better", "lower") == "lower"
    pairs = []
    for (where, ra, ca), (_, rb, cb) in zip(positions(table, test["a"], None), positions(table, test["b"], None)):
        a = mean_curve(table.curve_runs(ra, ca), test["tag"])
        b = mean_curve(table.curve_runs(rb, cb), test["tag"])
        if a is not None and b is not None:
            target, b_at = best_first(b, lower)
            a_at = next((x for x, y in zip(a[0], a[1]) if (y <= target if lower else y >= target)), None)
            pairs.append((where, a_at, b_at))
    a_name, b_name = test["a"].get("row") or test["a"]["column"], test["b"].get("row") or test["b"]["column"]
    return _positionwise(pairs, lambda a, b: a is not None and a < b,
                         f"{a_name} reaches {b_name}'s best {test['tag']} sooner")


def paper_value(table: Table, row: str, column: str) -> float | None:
    return table.paper_number(row, column)


def our_value(table: Table, row: str, column: str) -> float | None:
    return table.mean(row, column)
