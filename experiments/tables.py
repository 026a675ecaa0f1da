"""The paper's tables filled with our runs, and the paper's claims checked on them.

Everything paper-specific (which preset fills which table, the row and column keys, the metric, the
paper's numbers, the claims and their thresholds, the rule that decides them) lives in
``reference.yaml``; this module only knows how to group runs into cells and compare cells: on our
runs by a t-test over the seeds of each cell (``stats.py``), on the paper's numbers descriptively.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rundirs import MISSING, Run, dataset_missing
from stats import TTest, one_sample, welch

NOT_RUN = "not run"
NO_DATASET = "dataset not available"
HELD, NOT_HELD, NO_DATA = "held", "not held", "no data"
UNDECIDED = "not decided at this budget"
SHORT = {UNDECIDED: "not decided"}  # a position's verdict in a claim's detail


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
            values.append(Value(label=str(v["label"]), match=v.get("match") or {},
                                metric=v.get("metric")))
        else:
            values.append(Value(label=str(v), match={axis["key"]: [v]}))
    return values


@dataclass
class Cell:
    runs: list[Run]
    values: list[float]  # the metric of each finished run (one per seed)
    seeds: list = field(default_factory=list)  # the seed of each value

    def by_seed(self) -> dict:
        """{seed: value}; two runs of one seed (should there be any) give their mean."""
        out: dict = {}
        for seed, value in zip(self.seeds, self.values):
            out.setdefault(seed, []).append(value)
        return {seed: statistics.fmean(v) for seed, v in out.items()}

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        # sample standard deviation over seeds; one seed has none
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def status(self, missing_pattern: str) -> str:
        """What to print when there is no number: the most informative state among the cell's
        runs."""
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
        values, seeds = [], []
        for run in runs:
            value = run.get(metric) if run.status == "finished" and metric else MISSING
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(float(value))
                seeds.append(run.seed)
        return Cell(runs=runs, values=values, seeds=seeds)

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
        return (float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                else None)

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
    """ "ours (paper)": ours is the mean over seeds (± sample std when several ran) or why there is
    none."""
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
#
# On our numbers a claim is decided by a t-test over seeds (``rule`` in reference.yaml); on the
# paper's numbers (one number per cell, no seeds) it is a descriptive comparison, as printed.


@dataclass
class Rule:
    """When a difference decides a claim: a two-sided test at ``alpha``, ``min_seeds`` per side."""

    alpha: float = 0.05
    min_seeds: int = 3
    text: str = ""

    @classmethod
    def of(cls, reference: dict) -> Rule:
        spec = reference.get("rule") or {}
        rule = cls(alpha=float(spec.get("alpha", cls.alpha)),
                   min_seeds=int(spec.get("min_seeds", cls.min_seeds)), text=spec.get("text", ""))
        if not 0 < rule.alpha < 1 or rule.min_seeds < 2:
            raise ValueError(f"reference.yaml rule: alpha in (0, 1), min_seeds >= 2 (got {spec})")
        return rule

    def stated(self) -> str:
        return " ".join(self.text.format(alpha=f"{self.alpha:g}", min_seeds=self.min_seeds).split())


@dataclass
class Position:
    """One tested position of a claim (a depth, a k, ...): the test and its outcome."""

    where: str
    verdict: str  # held | not held | not decided at this budget
    seeds: tuple[int, ...]  # the values on each side (one for a one-sample test)
    estimate: float | None = None  # the tested difference; the claim says its sign
    p: float | None = None  # two-sided; None when no test was made
    why: str = ""  # why there is no p-value, or what the p-value rests on
    short: bool = False  # fewer runs than min_seeds on a side: more seeds would decide
    note: str = ""

    def text(self) -> str:
        n = " v ".join(map(str, self.seeds))
        parts = [f"{n} seed{'s' if max(self.seeds, default=0) != 1 else ''}"]
        if self.estimate is not None:
            parts.append(f"Δ {self.estimate:+.3g}")
        if self.p is not None:
            parts.append(fmt_p(self.p))
        if self.why:
            parts.append(self.why)
        if self.note:
            parts.append(self.note)
        return f"{self.where}: {', '.join(parts)}: {SHORT.get(self.verdict, self.verdict)}"


def fmt_p(p: float) -> str:
    return "p < 0.001" if 0 < p < 0.001 else f"p = {p:.3f}" if 0 < p < 1 else f"p = {p:g}"


@dataclass
class Verdict:
    verdict: str  # held | not held | not decided at this budget | no data
    detail: str
    test: str = ""  # what is tested, in words
    positions: list[Position] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # train.steps of the runs it rests on
    decide: str = ""  # for an undecided claim: what would decide it

    @property
    def budget(self) -> str:
        return f"{', '.join(map(str, self.steps))} steps" if self.steps else "–"

    @property
    def seeds(self) -> str:
        """The values per side the verdict rests on, e.g. "3 v 3" or "1 v 1, 3 v 3"."""
        seen = dict.fromkeys(" v ".join(map(str, p.seeds)) for p in self.positions)
        return ", ".join(seen) or "–"


def judged(where: str, seeds: tuple[int, ...], result: TTest, direction: int, rule: Rule,
           short: bool = False) -> Position:
    """Held if significant in the claim's ``direction`` (+1: estimate > 0, -1: < 0), not held if
    significant against it, otherwise not decided."""
    verdict = UNDECIDED
    if result.p < rule.alpha and result.estimate * direction > 0:
        verdict = HELD
    elif result.p < rule.alpha and result.estimate * direction < 0:
        verdict = NOT_HELD
    why = "" if result.spread else "no seed spread"
    return Position(where, verdict, seeds, result.estimate, result.p, why, short)


def two_sided(where: str, a: list[float], b: list[float], direction: int, rule: Rule,
              factor: float = 1.0, offset: float = 0.0, short: bool | None = None) -> Position:
    """Welch's test of mean(a) - factor * mean(b) - offset, on per-seed values."""
    seeds = (len(a), len(b))
    short = min(seeds) < rule.min_seeds if short is None else short
    if min(seeds) < rule.min_seeds:
        estimate = statistics.fmean(a) - factor * statistics.fmean(b) - offset if a and b else None
        return Position(where, UNDECIDED, seeds, estimate, None,
                        f"no test: fewer than {rule.min_seeds} per side", short)
    return judged(where, seeds, welch(a, [factor * v for v in b], offset), direction, rule, short)


def one_sided_value(where: str, a: list[float], value: float, direction: int,
                    rule: Rule) -> Position:
    """The one-sample t-test of mean(a) - value."""
    if len(a) < rule.min_seeds:
        return Position(where, UNDECIDED, (len(a),), statistics.fmean(a) - value, None,
                        f"no test: fewer than {rule.min_seeds} seeds", True)
    return judged(where, (len(a),), one_sample(a, value), direction, rule)


def combine(positions: list[Position], test: str, runs: list[Run], rule: Rule) -> Verdict:
    """Held if held at every position, not held if not held at one, otherwise not decided."""
    steps = sorted({v for r in runs if isinstance(v := r.get("config.train.steps"), int)})
    if not positions:
        return Verdict(NO_DATA, "", test, steps=steps)
    verdicts = [p.verdict for p in positions]
    verdict = (HELD if all(v == HELD for v in verdicts)
               else NOT_HELD if NOT_HELD in verdicts else UNDECIDED)
    by = {v: [p.where for p in positions if p.verdict == v] for v in (HELD, NOT_HELD, UNDECIDED)}
    head = "; ".join(f"{SHORT.get(v, v)} at {', '.join(w)}" for v, w in by.items() if w)
    detail = f"{head}. " + "; ".join(p.text() for p in positions)
    finished = [r for r in runs if r.status == "finished"]
    # runs that stopped on their own (a curriculum's plateau rule): a higher step cap moves nothing
    on_plateau = bool(finished) and all(r.get("metrics.plateau_reached") is True
                                        for r in finished)
    decide = what_decides(positions, rule, steps, on_plateau) if verdict == UNDECIDED else ""
    return Verdict(verdict, detail, test, positions, steps, decide)


def what_decides(positions: list[Position], rule: Rule, steps: list[int],
                 on_plateau: bool = False) -> str:
    open_ = [p for p in positions if p.verdict == UNDECIDED]
    few = [p.where for p in open_ if p.short]
    rest = [p.where for p in open_ if not p.short]
    parts = []
    if few:
        parts.append(f"{rule.min_seeds} seeds per cell" + (f" at {', '.join(few)}" if rest else ""))
    if rest and on_plateau:
        parts.append("more seeds, or a more patient plateau rule (every run stopped on its own "
                     "plateau rule, not at its step cap, so a higher cap changes nothing)"
                     + (f" at {', '.join(rest)}" if few else ""))
    elif rest:
        budget = f"a longer budget than {max(steps)} steps" if steps else "a longer budget"
        parts.append(f"{budget} or more seeds" + (f" at {', '.join(rest)}" if few else ""))
    return "; ".join(parts)


def positions(table: Table, side: dict, at: dict | None) -> list[tuple[str, str, str]]:
    """The cells of ``side`` ({row: L} or {column: L}) in order: (where, row, column)."""
    if "row" in side:
        out = [(f"{table.spec['columns']['label']}={c.label}", side["row"], c.label)
               for c in table.columns]
    else:
        out = [(f"{table.spec['rows']['label']}={r.label}", r.label, side["column"])
               for r in table.rows]
    if at:  # restrict to one column (or row) of the other axis
        out = [p for p in out
               if p[2] == str(at.get("column", p[2])) and p[1] == str(at.get("row", p[1]))]
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


def paired_cells(table: Table, test: dict) -> list[tuple[str, Cell, Cell]]:
    """(where, cell a, cell b) at every position where both cells have a number."""
    def cell(row: str, column: str) -> Cell | None:
        c = table.cells.get((row, column))
        return c if c and c.values else None

    pa = positions(table, test["a"], test.get("at"))
    pb = positions(table, test["b"], test.get("at"))
    return [(where, a, b) for (where, ra, ca), (_, rb, cb) in zip(pa, pb)
            if (a := cell(ra, ca)) and (b := cell(rb, cb))]


def _names(test: dict) -> tuple[str, str | None]:
    a = test["a"].get("row") or test["a"].get("column")
    b = (test.get("b") or {}).get("row") or (test.get("b") or {}).get("column")
    return a, b


def evaluate(claim: dict, tables: dict[str, Table], on_paper: bool = False,
             rule: Rule | None = None) -> Verdict:
    """Decide ``claim`` on our runs by ``rule``, or (``on_paper``) describe the paper's numbers."""
    table = tables.get(claim["table"])
    if table is None:
        return Verdict(NO_DATA, f"no table {claim['table']!r} in reference.yaml")
    if on_paper:
        return describe(claim, table, tables)
    rule = rule or Rule()
    test = claim["test"]
    kind = test["kind"]
    a_name, b_name = _names(test)
    m, f = float(test.get("margin", 0)), float(test.get("factor", 1))
    differences = {  # kind: (offset, factor, claimed sign, what is tested)
        "at_most": (m, 1.0, -1, f"{a_name} − {b_name} − {m:g}, claimed < 0"),
        "less": (0.0, 1.0, -1, f"{a_name} − {b_name}, claimed < 0"),
        "gap_at_least": (m, 1.0, +1, f"{a_name} − {b_name} − {m:g}, claimed > 0"),
        # a >= f * b; with f >= 1 on a metric >= 0 it implies a > b (0 v 0 decides nothing)
        "ratio_at_least": (0.0, f, +1, f"{a_name} − {f:g} × {b_name}, claimed > 0"),
    }
    if kind in differences:
        offset, factor, sign, what = differences[kind]
        pairs = paired_cells(table, test)
        found = [two_sided(w, a.values, b.values, sign, rule, factor, offset) for w, a, b in pairs]
        return combine(found, f"Welch on {what}", _runs(c for _, a, b in pairs for c in (a, b)),
                       rule)
    if kind == "under":
        t = float(test["threshold"])
        cells = [(w, c) for w, r, col in positions(table, test["a"], test.get("at"))
                 if (c := table.cells.get((r, col))) and c.values]
        found = [one_sided_value(w, c.values, t, -1, rule) for w, c in cells]
        return combine(found, f"one-sample t on {a_name} − {t:g}, claimed < 0",
                       _runs(c for _, c in cells), rule)
    if kind == "grows":
        cells = [(w, c) for w, r, col in positions(table, test["a"], test.get("at"))
                 if (c := table.cells.get((r, col))) and c.values]
        what = f"Welch on {a_name} at its last position − at its first, claimed > 0"
        if len(cells) < 2:
            return Verdict(NO_DATA, "", what)
        (w0, first), (w1, last) = cells[0], cells[-1]
        found = [two_sided(f"{w1} v {w0}", last.values, first.values, +1, rule)]
        return combine(found, what, _runs([first, last]), rule)
    if kind == "larger_gain":
        return larger_gain(table, tables, test, rule)
    if kind == "reaches_first":
        return reaches_first(table, test, rule)
    raise ValueError(f"unknown claim kind {kind!r} in reference.yaml")


def _runs(cells) -> list[Run]:
    return [r for c in cells for r in c.runs if r.status == "finished"]


def larger_gain(table: Table, tables: dict[str, Table], test: dict, rule: Rule) -> Verdict:
    """Welch on the per-seed gains a / b (each seed's mean ratio over the positions where it has
    both), ``table`` against ``than``."""
    a_name, b_name = _names(test)
    other = tables.get(test["than"])
    what = f"Welch on per-seed {a_name} / {b_name}, {table.id} − {test['than']}, claimed > 0"
    if other is None:
        return Verdict(NO_DATA, f"no table {test['than']!r}", what)
    gains, cells = [], []
    for t in (table, other):
        per_seed: dict = {}
        for _, a, b in paired_cells(t, test):
            cells += [a, b]
            ours, theirs = a.by_seed(), b.by_seed()
            for seed in ours.keys() & theirs.keys():
                if theirs[seed]:  # a ratio to nothing learned says nothing
                    per_seed.setdefault(seed, []).append(ours[seed] / theirs[seed])
        gains.append([statistics.fmean(v) for v in per_seed.values()])
    if not gains[0] or not gains[1]:
        return Verdict(NO_DATA, "", what)
    found = two_sided(f"{table.id} v {other.id}", gains[0], gains[1], +1, rule)
    found.note = (f"mean {a_name} / {b_name} {statistics.fmean(gains[0]):.2f} v "
                  f"{statistics.fmean(gains[1]):.2f}")
    return combine([found], what, _runs(cells), rule)


def first_reach(run: Run, tag: str, target: float, lower: bool) -> float | None:
    """The first x at which the run's curve ``tag`` reaches ``target``; None if it never does."""
    from curves import tags_of

    names = tags_of(run, tag)
    points = run.scalars[names[0]] if names else []
    return next((float(x) for x, y in points if (y <= target if lower else y >= target)), None)


def reaches_first(table: Table, test: dict, rule: Rule) -> Verdict:
    """At each position: the target is the best value that every run of ``b`` reaches (the worst of
    their per-run bests); Welch on the per-run first x at which each run's curve reaches it, a
    against b. A run of ``a`` that never reaches it is left out, counted, and keeps the position
    from being held."""
    from curves import tags_of

    lower = table.spec.get("better", "lower") == "lower"
    a_name, b_name = _names(test)
    tag = test["tag"]
    found, runs = [], []
    for (where, ra, ca), (_, rb, cb) in zip(positions(table, test["a"], None),
                                            positions(table, test["b"], None)):
        runs_a = [r for r in table.curve_runs(ra, ca) if tags_of(r, tag)]
        runs_b = [r for r in table.curve_runs(rb, cb) if tags_of(r, tag)]
        bests = [best(r.scalars[tags_of(r, tag)[0]], lower) for r in runs_b]
        bests = [v for v in bests if v is not None]
        if not runs_a or not bests:
            continue
        runs += runs_a + runs_b
        target = max(bests) if lower else min(bests)
        xa = [x for r in runs_a if (x := first_reach(r, tag, target, lower)) is not None]
        xb = [x for r in runs_b if (x := first_reach(r, tag, target, lower)) is not None]
        short = min(len(runs_a), len(runs_b)) < rule.min_seeds
        position = two_sided(where, xa, xb, -1, rule, short=short)
        position.note = f"target {target:.4g}, reached by {len(xa)} of {len(runs_a)} {a_name} runs"
        if len(xa) < len(runs_a) and position.verdict == HELD:
            position.verdict = UNDECIDED  # the runs that never got there speak against it
        found.append(position)
    what = (f"Welch on the per-run first x reaching the {tag} every {b_name} run reaches, "
            f"{a_name} − {b_name}, claimed < 0")
    return combine(found, what, runs, rule)


def best(points: list[tuple[int, float]], lower: bool) -> float | None:
    values = [y for _, y in points]
    return (min(values) if lower else max(values)) if values else None


def describe(claim: dict, table: Table, tables: dict[str, Table]) -> Verdict:
    """The claim on the paper's numbers (one number per cell): a descriptive comparison."""
    value = paper_value
    test = claim["test"]
    kind = test["kind"]
    a_name, b_name = _names(test)
    if kind == "at_most":
        m = float(test["margin"])
        return _positionwise(paired(table, test, value), lambda a, b: a <= b + m,
                             f"{a_name} ≤ {b_name} + {m:g}")
    if kind == "less":
        return _positionwise(paired(table, test, value), lambda a, b: a < b, f"{a_name} < {b_name}")
    if kind == "gap_at_least":
        m = float(test["margin"])
        return _positionwise(paired(table, test, value), lambda a, b: a - b >= m,
                             f"{a_name} − {b_name} ≥ {m:g}")
    if kind == "ratio_at_least":
        f = float(test["factor"])
        # a > b too: when neither learned anything (0 and 0) the ratio says nothing
        return _positionwise(paired(table, test, value), lambda a, b: a >= f * b and a > b,
                             f"{a_name} ≥ {f:g} × {b_name}")
    if kind == "under":
        t = float(test["threshold"])
        points = [(w, v) for w, r, c in positions(table, test["a"], test.get("at"))
                  if (v := value(table, r, c)) is not None]
        return _positionwise([(w, v, t) for w, v in points], lambda a, b: a <= b,
                             f"{a_name} ≤ {t:g}")
    if kind == "grows":
        points = [(w, v) for w, r, c in positions(table, test["a"], test.get("at"))
                  if (v := value(table, r, c)) is not None]
        if len(points) < 2:
            return Verdict(NO_DATA, "")
        (w0, v0), (w1, v1) = points[0], points[-1]
        return Verdict(HELD if v1 > v0 else NOT_HELD,
                       f"{a_name}: {v0:.3g} at {w0}, {v1:.3g} at {w1}")
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
                       f"mean {a_name} / {b_name}: {gains[0]:.2f} on {table.id}, "
                       f"{gains[1]:.2f} on {other.id}")
    if kind == "reaches_first":
        return Verdict(NO_DATA, "")  # the paper's curves are not numbers here
    raise ValueError(f"unknown claim kind {kind!r} in reference.yaml")


def _positionwise(pairs, ok: Callable[[float, float], bool], what: str) -> Verdict:
    if not pairs:
        return Verdict(NO_DATA, "")
    failing = [where for where, a, b in pairs if not ok(a, b)]
    detail = f"{what} at {len(pairs) - len(failing)} of {len(pairs)}"
    if failing:
        detail += f"; not at {', '.join(failing)}"
    return Verdict(NOT_HELD if failing else HELD, detail)


def paper_value(table: Table, row: str, column: str) -> float | None:
    return table.paper_number(row, column)
