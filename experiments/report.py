"""``make report``: experiments/RESULTS.md and its figures, from the runs on disk.

    python experiments/report.py --profile cpu            # reads runs/cpu/<preset>/<job>/
    python experiments/report.py --profile smoke --runs /tmp/runs --out /tmp/report --evidence none

Every number comes from the runs (``summary.json`` and the TensorBoard events, read with
TensorBoard's ``EventAccumulator``), from the evidence archive of earlier runs
(``experiments/evidence/<profile>/``: the finished runs on disk are archived there first, see
``rundirs``) or from ``reference.yaml`` (the paper's numbers, the table
layout, the claims); nothing about the results is written here. A cell without a run says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import figures
import yaml
from rundirs import (
    MISSING,
    Run,
    archive_record,
    archived_tags,
    dataset_missing,
    first_line,
    load_runs,
)
from tables import (
    HELD,
    NO_DATA,
    NOT_HELD,
    UNDECIDED,
    Rule,
    Table,
    Verdict,
    cell_text,
    evaluate,
    fmt,
)

from sgrun.errors import SgrunError
from sgrun.metrics import write_bytes_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the repository: runs/, conf/
REFERENCE = HERE / "reference.yaml"
EVIDENCE = HERE / "evidence"  # the archive: <profile>/<preset>/<job>.json
CONFIDENCE = {
    "paper": "quoted or confirmed by several sources",
    "recalled": "recalled, not confirmed by a stored copy of the paper",
    "secondary": "measured by another implementation, not the paper",
    "none": "not from the paper (an ablation of ours)",
}
MARK = {HELD: "**held**", NOT_HELD: "**not held**", UNDECIDED: "not decided at this budget",
        NO_DATA: "no data"}


def load_reference(path: str | Path = REFERENCE) -> dict:
    return yaml.safe_load(Path(path).read_text())


def paper_presets(conf_dir: Path = ROOT / "conf") -> list[str]:
    """Every experiment preset that reproduces a paper result (all but the newcomer's demo)."""
    return sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml") if p.stem != "demo")


def build_tables(reference: dict, runs: list[Run]) -> dict[str, Table]:
    return {spec["id"]: Table(spec, runs) for spec in reference["tables"]}


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it: RESULTS.md should not name one machine's
    folders."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def archive_runs(runs_dir: str | Path, evidence_dir: str | Path, reference: dict) -> int:
    """Archive every finished run of ``runs_dir`` (``<runs>/<profile>``) in ``evidence_dir``
    (``<evidence>/<profile>``), one ``<preset>/<job>.json`` each; return how many files changed."""
    tags = archived_tags(reference)
    changed = 0
    for run in load_runs(runs_dir):
        if run.status != "finished":
            continue
        path = Path(evidence_dir) / run.path.parent.name / f"{run.path.name}.json"
        payload = (json.dumps(archive_record(run, tags), indent=1, sort_keys=True) + "\n").encode()
        try:
            if path.read_bytes() == payload:
                continue
        except OSError:
            pass
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SgrunError(f"cannot create the archive folder {path.parent} ({e.strerror}): "
                             "free space or pass --evidence none") from None
        write_bytes_atomic(path, payload)
        changed += 1
    return changed


def write_report(profile: str, runs_root: str | Path = ROOT / "runs", out_dir: str | Path = HERE,
                 reference: dict | None = None, evidence_root: str | Path | None = None) -> Path:
    """Write ``out_dir/RESULTS.md`` and the figures for the runs of ``runs_root/profile`` (and,
    with ``evidence_root``, the archived runs of ``evidence_root/profile``); return its path."""
    reference = reference or load_reference()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(runs_root) / profile
    evidence_dir = Path(evidence_root) / profile if evidence_root is not None else None
    runs = load_runs(runs_dir, evidence_dir)
    tables = build_tables(reference, runs)
    drawn = {}
    for spec in reference.get("figures", []):
        drawn[spec["file"]] = figures.draw(spec, tables[spec["table"]], out_dir)
    text = render(reference, tables, runs, profile, runs_dir, drawn, evidence_dir)
    path = out_dir / "RESULTS.md"
    write_bytes_atomic(path, text.encode())  # whole or not at all
    return path


# ---------------------------------------------------------------------------------------------
# Markdown


def render(reference: dict, tables: dict[str, Table], runs: list[Run], profile: str, runs_dir: Path,
           drawn: dict[str, figures.Outcome], evidence_dir: Path | None = None) -> str:
    pattern = reference["dataset_missing"]
    rule = Rule.of(reference)
    claims = [(c, evaluate(c, tables, rule=rule), evaluate(c, tables, on_paper=True))
              for c in reference.get("claims", [])]
    ablations = [(c, evaluate(c, tables, rule=rule)) for c in reference.get("ablations", [])]
    out = ["# Results: sgrun next to the paper", ""]
    out += opening(runs, profile, runs_dir, evidence_dir)
    out += ["", "## Summary", ""]
    out += summary_section(claims, rule, runs, profile, ablations)
    out += ["", "## The runs", ""]
    out += header(runs, pattern)
    out += ["", "## The paper's claims on our numbers", ""]
    out += claims_section(claims, rule)
    if ablations:
        out += ["", "## Ablations: our own comparisons, not claims of the paper", ""]
        out += ablations_section(ablations, rule)
    done: set[str] = set()
    for spec in reference["tables"]:
        group = spec.get("group") or spec["id"]
        if group in done:
            continue
        done.add(group)
        members = [tables[s["id"]] for s in reference["tables"]
                   if (s.get("group") or s["id"]) == group]
        out += ["", f"## {members[0].spec.get('title') or group}", ""]
        out += table_section(members, pattern)
    out += ["", "## Figures", ""]
    out += figures_section(reference, drawn)
    out += ["", "## Runs per preset", ""]
    out += runs_section(runs, pattern)
    out += ["", "## The paper's settings and ours", ""]
    out += settings_section(reference, runs)
    return "\n".join(out) + "\n"


def opening(runs: list[Run], profile: str, runs_dir: Path,
            evidence_dir: Path | None = None) -> list[str]:
    budgets = sorted({_budget(r) for r in runs if _budget(r)})
    source = f"the runs in `{shown(runs_dir)}/`"
    if evidence_dir is not None:
        archived = sum(r.archived and r.status == "finished" for r in runs)
        source += (f" and the archive of finished runs in `{shown(evidence_dir)}/` ({archived} of "
                   "the finished runs below are read from the archive: their folders are not on "
                   "this machine)")
    return [
        f"Written by `make report PROFILE={profile}` from {source} "
        f"(`make reproduce PROFILE={profile}` runs them). Do not edit: run it again.",
        "",
        f"- **Profile**: `{profile}`" + (f" ({'; '.join(budgets)})" if budgets else ""),
    ]


def summary_section(claims: list[tuple[dict, Verdict, Verdict]], rule: Rule, runs: list[Run],
                    profile: str, ablations: list[tuple[dict, Verdict]] = ()) -> list[str]:
    """Counts of the verdicts, one line per claim grouped by verdict, the profile's minutes."""
    minutes = sum(_minutes(r) for r in runs if r.status == "finished")
    counts = {v: sum(ours.verdict == v for _, ours, _ in claims) for v in MARK}
    lines = [f"Of the paper's {len(claims)} claims, on our numbers: "
             + ", ".join(f"{n} {v}" for v, n in counts.items())
             + f". Profile `{profile}`: {minutes:.1f} minutes of training in all. A claim is "
             f"decided by Welch's t-test at {rule.alpha:g} with at least {rule.min_seeds} seeds "
             "per side (the rule is under the claims).", ""]
    for verdict in MARK:
        chosen = [(c, ours) for c, ours, _ in claims if ours.verdict == verdict]
        if chosen:
            lines.append(f"{MARK[verdict]} ({len(chosen)}):")
            lines.append("")
        for claim, ours in chosen:
            line = f"- {claim['text']}"
            if ours.positions:
                line += f" ({ours.seeds} seeds, {ours.budget})"
            if ours.decide:
                line += f"; would decide: {ours.decide}"
            lines.append(line)
        if chosen:
            lines.append("")
    if ablations:
        lines += ["Ablations (ours, not claims of the paper; same rule):", ""]
        for ablation, verdict in ablations:
            lines.append(f"- {ablation['text']}: {MARK[verdict.verdict]}"
                         + (f" ({verdict.seeds} seeds, {verdict.budget})" if verdict.positions
                            else "")
                         + (f"; would decide: {verdict.decide}" if verdict.decide else ""))
        lines.append("")
    return lines[:-1] if lines[-1] == "" else lines


def header(runs: list[Run], pattern: str) -> list[str]:
    finished = [r for r in runs if r.status == "finished"]
    failed = [r for r in runs if r.status == "failed"]
    missing = [r for r in failed if dataset_missing(r, pattern)]
    unfinished = [r for r in runs if r.status == "unfinished"]
    minutes = sum(_minutes(r) for r in finished)
    seeds = _seeds(runs)
    lines = [
        f"- **Seeds**: {', '.join(map(str, seeds)) or 'none'}; a cell is the mean ± sample std "
        "over seeds when several ran",
        f"- **Runs**: {len(finished)} finished, {len(failed)} failed"
        + (f" ({len(missing)} because their dataset is not available)" if missing else "")
        + f", {len(unfinished)} unfinished; {minutes:.1f} minutes of training in all",
        "",
        "Each cell reads **ours (paper)**; `–` means no number is known. The paper's numbers carry "
        "a confidence: " + "; ".join(f"*{k}*: {v}" for k, v in CONFIDENCE.items()) + ".",
    ]
    return lines


def _seeds(runs: list[Run]) -> list:
    # 2 before 10
    return sorted({r.seed for r in runs if r.seed is not None}, key=lambda s: str(s).zfill(12))


def _minutes(run: Run) -> float:
    value = run.get("metrics.minutes")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _budget(run: Run) -> str:
    """The preset's budget as the run used it: ``<preset> <steps> steps, lr <lr>``."""
    steps, lr = run.get("config.train.steps"), run.get("config.optim.lr")
    if not isinstance(steps, int) or not isinstance(lr, (int, float)):
        return ""  # no config (a run folder whose .hydra/ is gone): no budget to state
    return f"{run.get('config.name') or 'run'} {steps} steps, lr {lr:g}"


def _seed_count(table: Table) -> int:
    return len({r.seed for r in table.runs})


def table_section(members: list[Table], pattern: str) -> list[str]:
    """One markdown table; tables of one group share their columns and get a first column naming
    each."""
    first = members[0]
    col_axis = first.spec["columns"]
    heads = [f"{col_axis['label']} = {c.label}" if "key" in col_axis else c.label
             for c in first.columns]
    grouped = len(members) > 1
    lead = (["task"] if grouped else []) + [first.spec["rows"]["label"]]
    lines = ["| " + " | ".join(lead + heads) + " |", "|" + "---|" * (len(lead) + len(heads))]
    for table in members:
        seeds = _seed_count(table)
        for row in table.rows:
            cells = [cell_text(table, row.label, c.label, pattern, seeds) for c in table.columns]
            lead_cells = ([table.spec.get("short", table.id)] if grouped else []) + [row.label]
            lines.append("| " + " | ".join(lead_cells + cells) + " |")
    lines.append("")
    for table in members:
        paper = table.spec.get("paper") or {}
        what = f"{table.spec['short']}: " if grouped else ""
        unit = f"{table.spec['unit']}. " if table.spec.get("unit") else ""
        note = f" {paper['note']}" if paper.get("note") else ""
        numbers = (f" In parentheses: {paper.get('source', 'the paper')} "
                   f"[{paper.get('confidence', 'paper')}]."
                   if paper.get("values") else "")
        if table.spec.get("ablation"):
            lines.append(f"- {what}{unit}Not in the paper ({table.spec.get('section', '')}).{note}")
            continue
        lines.append(f"- {what}{unit}Paper, {table.spec.get('section', '')}.{numbers}{note}")
    lines += [line for table in members if (line := plateau_line(table, grouped))]
    return lines


def plateau_line(table: Table, grouped: bool) -> str | None:
    """How a table's runs stopped: on their plateau rule (``train.plateau_samples``: the curriculum
    stopped advancing) or at the step cap (``train.steps``)."""
    key = table.spec.get("plateau")
    if not key:
        return None
    what = f"{table.spec['short']}: " if grouped else ""
    finished = [r for r in table.runs if r.status == "finished"]
    if not finished:
        return f"- {what}no finished run yet, so none reached a plateau rule or the step cap."
    reached = sum(r.get(key) is True for r in finished)
    capped = sum(r.get(key) is False for r in finished)
    unset = len(finished) - reached - capped
    line = (f"- {what}of {len(finished)} finished runs, {reached} reached their plateau rule "
            f"(`train.plateau_samples`), {capped + unset} hit the step cap (`train.steps`)")
    return line + (f", {unset} of them with no plateau rule." if unset else ".")


def claims_section(claims: list[tuple[dict, Verdict, Verdict]], rule: Rule) -> list[str]:
    lines = ["| verdict | claim | tested | on our numbers | seeds per side | budget | "
             "on the paper's numbers (descriptive) | source |",
             "|---|---|---|---|---|---|---|---|"]
    for claim, ours, paper in claims:
        lines.append(claim_line(claim, ours, paper, rule))
    lines += ["", f"**Rule** (`rule` in `experiments/reference.yaml`): {rule.stated()}", "",
              "Each position reads `where: seeds a v b, Δ (the tested difference), p: verdict`; "
              "the budget is the training steps (`train.steps`) of the runs a verdict rests on. "
              "What each kind of claim tests, and the thresholds, are in "
              "`experiments/reference.yaml`."]
    return lines


def ablations_section(ablations: list[tuple[dict, Verdict]], rule: Rule) -> list[str]:
    lines = ["| verdict | comparison | tested | on our numbers | seeds per side | budget | "
             "source |",
             "|---|---|---|---|---|---|---|"]
    lines += [claim_line(c, v, None, rule) for c, v in ablations]
    lines += ["", "Not in the paper: questions of this project about its own choices, decided by "
              "the same rule as the paper's claims (their tables are further down)."]
    return lines


def claim_line(claim: dict, ours: Verdict, paper: Verdict | None, rule: Rule) -> str:
    """One verdict: what is tested, the positions with their seeds and p-values, the budget."""
    detail = ours.detail or ("no p-value: no numbers to test yet" if ours.verdict == NO_DATA
                             else "–")
    tested = (f"{ours.test}; two-sided at {rule.alpha:g}, ≥ {rule.min_seeds} seeds per side"
              if ours.test else "–")
    if ours.decide:
        detail += f". Would decide: {ours.decide}"
    if paper is None:
        paper_text = None
    else:
        paper_text = "–" if paper.verdict == NO_DATA else f"{paper.verdict} ({paper.detail})"
    cells = [MARK[ours.verdict], claim["text"], tested, detail, ours.seeds, ours.budget]
    cells += [] if paper_text is None else [paper_text]
    cells.append(f"{claim['source']} [{claim['confidence']}]")
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def figures_section(reference: dict, drawn: dict[str, figures.Outcome]) -> list[str]:
    lines, skipped = [], []
    for spec in reference.get("figures", []):
        outcome = drawn[spec["file"]]
        if outcome.drawn:
            lines += [f"### {spec['title']}", "", f"![{spec['title']}]({spec['file']})", ""]
            if outcome.note:
                lines += [f"Note: {outcome.note}.", ""]
        else:
            skipped.append(f"- *{spec['title']}*: not drawn: {outcome.note}.")
    if skipped:
        lines += ["Not drawn yet:", ""] + skipped
    return lines


def runs_section(runs: list[Run], pattern: str) -> list[str]:
    by_preset: dict[str, list[Run]] = {p: [] for p in paper_presets()}
    for run in runs:
        by_preset.setdefault(str(run.get("preset")), []).append(run)
    lines = ["| preset | finished | failed | unfinished | seeds | steps per run | training minutes "
             "| note |",
             "|---|---|---|---|---|---|---|---|"]
    for preset, preset_runs in sorted(by_preset.items()):
        n = {s: sum(r.status == s for r in preset_runs)
             for s in ("finished", "failed", "unfinished")}
        seeds = ", ".join(map(str, _seeds(preset_runs)))
        minutes = sum(_minutes(r) for r in preset_runs if r.status == "finished")
        failed = [r for r in preset_runs if r.status == "failed"]
        if not preset_runs:
            note = "not run"
        elif failed and all(dataset_missing(r, pattern) for r in failed):
            note = f"dataset not available: {first_line(failed[0].message)}"
        elif failed:
            note = f"failed: {first_line(failed[0].message)} (see {shown(failed[0].path)}/FAILED)"
        else:
            note = ""
        broken = [r for r in preset_runs if r.status == "unfinished" and r.message]
        if broken:
            note = "; ".join(filter(None, [note,
                                           f"{len(broken)} unfinished: {shown(broken[0].path)}: "
                                           f"{first_line(broken[0].message)}"]))
        steps = sorted({v for r in preset_runs if isinstance(v := r.get("metrics.steps"), int)})
        lines.append(f"| {preset} | {n['finished']} | {n['failed']} | {n['unfinished']} | "
                     f"{seeds or '–'} | {', '.join(map(str, steps)) or '–'} | {minutes:.1f} | "
                     f"{note.replace('|', '/')} |")
    return lines


def settings_section(reference: dict, runs: list[Run]) -> list[str]:
    lines = ["| setting | paper | confidence | our runs |", "|---|---|---|---|"]
    for s in reference.get("settings", []):
        ours = "–"
        if s.get("config"):
            chosen = [r for r in runs if r.matches(s.get("where"))]
            found = sorted({_show(v) for r in chosen if (v := r.get(s["config"])) is not MISSING})
            ours = ", ".join(found) if found else ("not run" if not chosen else "not in the config")
        lines.append(f"| {s['name']} | {_show(s['value'])} | {s['confidence']} | {ours} |")
    return lines


def _show(value) -> str:
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    if isinstance(value, float):
        return fmt(value, 6).rstrip("0").rstrip(".") if abs(value) >= 1e-3 else f"{value:g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu",
                        help="the profile whose runs to report (runs/<profile>/)")
    parser.add_argument("--runs", default=str(ROOT / "runs"),
                        help="the folder holding <profile>/<preset>/<job>/ (default: the "
                             "repository's runs/)")
    parser.add_argument("--out", default=str(HERE),
                        help="where RESULTS.md and the figures go (default: experiments/)")
    parser.add_argument("--reference", default=str(REFERENCE),
                        help="the paper's numbers and the table layout")
    parser.add_argument("--evidence", default=str(EVIDENCE),
                        help="the archive of finished runs, "
                             "<evidence>/<profile>/<preset>/<job>.json: the finished runs on disk "
                             "are archived there, then the report reads both (default: "
                             "experiments/evidence; none: the runs on disk only)")
    args = parser.parse_args(argv)
    evidence = None if args.evidence == "none" else Path(args.evidence)
    try:
        reference = load_reference(args.reference)
        if evidence is not None:
            changed = archive_runs(Path(args.runs) / args.profile, evidence / args.profile,
                                   reference)
            if changed:
                print(f"report: archived {changed} finished run(s) in "
                      f"{shown(evidence / args.profile)}/")
        path = write_report(args.profile, args.runs, args.out, reference, evidence)
    except SgrunError as e:  # a full disk or a folder in the way: one line, the old report kept
        print(f"report: error: {e}; the previous report is left as it was", file=sys.stderr)
        return 1
    pngs = sorted(p.name for p in path.parent.glob("fig_*.png"))
    print(f"report: wrote {path}"
          + (f" and {len(pngs)} figure(s): {', '.join(pngs)}" if pngs else " (no figures yet)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
