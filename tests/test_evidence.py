"""The evidence archive (experiments/evidence/): the report reads the same results from archived
runs as from their folders, a finished run on disk wins over its archived copy, a broken archive
file is named, not dropped."""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402
from rundirs import load_runs  # noqa: E402
from test_report import mnist_fcn, runs, write  # noqa: E402, F401  (runs: test_report's fixture)

PNG = b"\x89PNG\r\n\x1a\n"


def archive(root: Path, evidence: Path) -> int:
    return report.archive_runs(root / "smoke", evidence / "smoke", report.load_reference())


def body(text: str) -> str:
    """The report without its opening paragraph (which names where the runs were read from)."""
    return text.split("\n## Summary", 1)[1]


def test_the_report_reads_the_same_from_the_archive(runs, tmp_path):  # noqa: F811
    # only finished runs are archived: a failed one is this machine's (a dataset it lacks)
    shutil.rmtree(runs / "smoke" / "cifar10_fcn")
    from_disk = write(runs, tmp_path / "disk")
    evidence = tmp_path / "evidence"
    assert archive(runs, evidence) > 0
    assert archive(runs, evidence) == 0  # unchanged runs are not written again
    shutil.rmtree(runs)
    out = tmp_path / "archived"
    text = report.write_report("smoke", runs, out, evidence_root=evidence).read_text()
    assert body(text) == body(from_disk)
    assert "are read from the archive" in text.split("\n## Summary", 1)[0]
    for png in sorted((tmp_path / "disk").glob("fig_*.png")):
        assert (out / png.name).read_bytes().startswith(PNG)  # the curves came along


def test_only_the_curves_the_report_reads_are_kept(runs, tmp_path):  # noqa: F811
    evidence = tmp_path / "evidence"
    archive(runs, evidence)
    files = sorted((evidence / "smoke").glob("*/*.json"))
    copy = json.loads(next(f for f in files if f.parent.name == "table1_copy").read_text())
    assert set(copy["curves"]) == {"by_samples/largest_solved"}  # not loss/train
    assert copy["record"]["metrics"]["largest_n"] > 0
    # nothing of a failed run (no result to keep)
    assert not (evidence / "smoke" / "cifar10_fcn").exists()


def test_a_finished_run_on_disk_wins_over_its_archived_copy(tmp_path):
    root, evidence = tmp_path / "runs", tmp_path / "evidence"
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.0])
    archive(root, evidence)
    summary = root / "smoke" / "mnist_fcn" / "3_none_0" / "summary.json"
    record = json.loads(summary.read_text())
    record["metrics"]["test_error"] = 1.5  # a new run of the same job
    summary.write_text(json.dumps(record))
    (run,) = load_runs(root / "smoke", evidence / "smoke")
    assert not run.archived and run.get("metrics.test_error") == 1.5
    # the job started again and is not finished yet: its archived result stands meanwhile
    summary.unlink()
    (run,) = load_runs(root / "smoke", evidence / "smoke")
    assert run.archived and run.get("metrics.test_error") == 2.0
    assert run.scalars["error/test"] == [(100, 9.0), (200, 4.0), (300, 2.0)]


def test_a_broken_archive_file_is_named_in_the_report(tmp_path):
    root, evidence = tmp_path / "runs", tmp_path / "evidence"
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.0])
    mnist_fcn(root, 3, "cdni", [9.0, 4.0, 2.1])
    archive(root, evidence)
    shutil.rmtree(root)
    broken = evidence / "smoke" / "mnist_fcn" / "3_cdni_0.json"
    broken.write_text(broken.read_text()[:40])  # cut short
    runs_found = load_runs(root / "smoke", evidence / "smoke")
    assert [r.status for r in runs_found] == ["unfinished", "finished"]
    text = report.write_report("smoke", root, tmp_path / "out",
                               evidence_root=evidence).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| mnist_fcn |"))
    assert "| 1 | 0 | 1 |" in row and "3_cdni_0.json" in row and "unreadable" in row


def test_make_report_archives_then_reports(runs, tmp_path, capsys):  # noqa: F811
    evidence = tmp_path / "evidence"
    argv = ["--profile", "smoke", "--runs", str(runs), "--out", str(tmp_path / "out"),
            "--evidence", str(evidence)]
    assert report.main(argv) == 0
    assert "archived" in capsys.readouterr().out
    assert sorted(p.parent.name for p in (evidence / "smoke").glob("*/*.json"))
    assert report.main(argv) == 0
    assert "archived" not in capsys.readouterr().out  # nothing new to archive
    assert report.main(argv[:-1] + ["none"]) == 0


def test_the_same_run_under_two_job_numbers_counts_once(tmp_path):
    """A narrowed sweep numbers its jobs differently: the same config and seed in two folders is
    one run, not two seeds' worth of evidence."""
    root, evidence = tmp_path / "runs", tmp_path / "evidence"
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.0], seed=1)
    archive(root, evidence)
    (evidence / "smoke" / "mnist_fcn" / "3_none_1.json").rename(
        evidence / "smoke" / "mnist_fcn" / "0_none_1.json")
    runs_found = load_runs(root / "smoke", evidence / "smoke")
    assert [r.status for r in runs_found] == ["unfinished", "finished"]
    assert not runs_found[1].archived
    assert ("0_none_1.json is the same run as 3_none_1 (same config and seed)"
            in runs_found[0].message)
    # another seed is another run
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.5], seed=2)
    assert [r.status for r in load_runs(root / "smoke")] == ["finished", "finished"]
