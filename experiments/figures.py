"""The report's figures: matplotlib (Agg backend, no display needed), written as PNG files."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from curves import Curve, mean_curve, tags_of
from matplotlib import cm, colors
from tables import Table, Value

from sgrun.metrics import write_bytes_atomic

# files only: works on machines and CI runners without a display (pyplot picks its backend lazily,
# at the first figure, so choosing it after the import is enough)
matplotlib.use("Agg")

Panel = tuple[str, list[tuple[str, Curve, int]]]  # title, [(curve label, curve, colour index)]


@dataclass
class Outcome:
    drawn: bool
    note: str  # why it was not drawn, or what differs from the intended figure


def draw(spec: dict, table: Table, out_dir: Path) -> Outcome:
    """Draw figure ``spec`` from ``table``'s finished runs into ``out_dir`` (PNG).

    A spec may name a ``fallback`` (another tag and axis label) for runs too short to have logged
    the intended curve, e.g. no curriculum level solved yet: the figure is then drawn from it, and
    the note says so.
    """
    path = Path(out_dir) / spec["file"]
    if _draw(spec, table, path):
        return Outcome(True, "")
    if spec.get("fallback"):
        fallback = {**spec, **spec["fallback"]}
        if _draw(fallback, table, path):
            return Outcome(True, f"drawn from `{fallback['tag']}`: no finished run has logged "
                                 f"`{spec['tag']}` yet")
    # a figure left from older runs would contradict the tables next to it
    path.unlink(missing_ok=True)
    return Outcome(False, f"no finished runs with `{spec['tag']}` in their TensorBoard events yet "
                          f"(table `{table.id}`)")


def _draw(spec: dict, table: Table, path: Path) -> bool:
    if spec["kind"] == "curves":
        panels = curve_panels(spec, table)
        return _draw_curves(spec, panels, path) if panels else False
    if spec["kind"] == "against_key":
        return _draw_against_key(spec, table, path)
    raise ValueError(f"unknown figure kind {spec['kind']!r} in reference.yaml")


def _title(axis: dict, value: Value) -> str:
    return f"{axis['label']} = {value.label}" if "key" in axis else value.label


def curve_panels(spec: dict, table: Table) -> list[Panel]:
    """One panel per row, column or tag; in each, one mean curve per value of the other axis."""
    tag, by, steps = spec["tag"], spec.get("panels", "rows"), bool(spec.get("step_curve"))
    panels: list[Panel] = []
    if by == "tags":
        tags = sorted({t for run in table.curve_runs() for t in tags_of(run, tag)})
        for t in tags:
            curves = [(row.label, mean_curve(table.curve_runs(row=row.label), t, steps), i)
                      for i, row in enumerate(table.rows)]
            panels.append((t, [c for c in curves if c[1] is not None]))
    else:
        outer, inner = (table.rows, table.columns) if by == "rows" else (table.columns, table.rows)
        outer_axis = table.spec["rows" if by == "rows" else "columns"]
        for o in outer:
            curves = []
            for index, i in enumerate(inner):
                row, column = (o.label, i.label) if by == "rows" else (i.label, o.label)
                curve = mean_curve(table.curve_runs(row, column), tag, steps)
                if curve is not None:
                    curves.append((i.label, curve, index))
            panels.append((_title(outer_axis, o), curves))
    return [p for p in panels if p[1]]


def _grid(n: int, width: float = 4.6, height: float = 3.4):
    cols = 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    # constrained layout keeps titles, labels and a colorbar from overlapping
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _draw_curves(spec: dict, panels: list[Panel], path: Path) -> bool:
    fig, axes = _grid(len(panels))
    step = bool(spec.get("step_curve"))  # curriculum levels change in jumps
    for ax, (title, curves) in zip(axes, panels):
        for label, (xs, mean, std), index in curves:
            colour = f"C{index}"  # a method keeps its colour in every panel
            ax.plot(xs, mean, label=label, color=colour, marker="o" if len(xs) < 3 else None,
                    drawstyle="steps-post" if step else "default")
            if std.any():  # mean ± std over seeds
                ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=colour,
                                step="post" if step else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(spec.get("xlabel", "training step"))
        ax.set_ylabel(spec.get("ylabel", spec["tag"]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(spec["title"])
    save(fig, path)
    return True


def _draw_against_key(spec: dict, table: Table, path: Path) -> bool:
    """The paper's stochastic-update figure: the metric against the row key (update_prob), one line
    per evaluation step coloured by iteration, and the final value in black; one panel per
    column."""
    panels = []
    for column in table.columns:
        points = []  # (key value, {step: mean over seeds}, final mean)
        for row in table.rows:
            curve = mean_curve(table.curve_runs(row.label, column.label), spec["tag"])
            if curve is not None:
                points.append((float(row.label), dict(zip(curve[0], curve[1])),
                               table.mean(row.label, column.label)))
        if points:
            panels.append((column.label, sorted(points)))
    if not panels:
        return False
    last = max(step for _, pts in panels for _, curve, _ in pts for step in curve)
    norm = colors.Normalize(vmin=0, vmax=last)
    cmap = matplotlib.colormaps["viridis"]
    fig, axes = _grid(len(panels))
    for ax, (title, pts) in zip(axes, panels):
        for step in sorted({s for _, curve, _ in pts for s in curve}):
            xs = [p for p, curve, _ in pts if step in curve]
            ys = [curve[step] for _, curve, _ in pts if step in curve]
            ax.plot(xs, ys, color=cmap(norm(step)), marker=".", linewidth=1)
        finals = [(p, final) for p, _, final in pts if final is not None]
        if finals:
            ax.plot(*zip(*finals), color="black", marker="o", linewidth=2, label="final")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(table.spec["rows"]["label"])
        ax.set_ylabel(spec.get("ylabel", spec["tag"]))
        ax.grid(alpha=0.3)
    fig.suptitle(spec["title"])
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="training step")
    save(fig, path)
    return True


def save(fig, path: Path) -> None:
    """The PNG through a temporary file and a rename: a figure is whole or absent, never cut
    short."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
