"""The repository explains itself (docs/architecture.md, invariant 8).

No tracked text file cites a design note or reference file kept outside the repository, and none names a
machine-specific path. Data read from beside the repository (``../shared/data/...``, e.g. the IU X-Ray reports
of ``bench/labeler_iu.py``) is an input location, not a citation, and stays allowed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml")

#: Files that still hold a known outside citation and may not be edited by the change that added this test.
#: Remove an entry once the file is fixed (the test below fails when an entry is no longer needed).
PENDING: dict[str, str] = {}

CITATION = re.compile(
    r"DESIGN\.md"  # the design note kept outside the repository
    r"|\bDESIGN (?:invariant|\")"  # ... cited without its suffix
    r"|\breference/[\w.-]+\.md"  # reference/<name>.md
    r"|\b(?:flower-1\.42|mlip-method|opacus-1\.6|datasets)\.md"  # the reference files by bare name
    r"|\.\./shared/(?!data/)"  # anything beside the repository other than its data folder
)
ABSOLUTE = re.compile(r"(?<![\w.~-])/work/")
SELF = "tests/test_repository_self_contained.py"


def _tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:  # e.g. a source tree without .git
        pytest.skip(f"git ls-files unavailable: {exc}")
    return sorted(p for p in out.split("\0") if p.endswith(SUFFIXES) and p != SELF and (REPO / p).is_file())


def _hits(path: str) -> list[str]:
    text = (REPO / path).read_text(encoding="utf-8", errors="replace")
    return [
        f"{path}:{number}: {line.strip()[:160]}"
        for number, line in enumerate(text.splitlines(), 1)
        if CITATION.search(line) or ABSOLUTE.search(line)
    ]


def test_no_outside_citations_and_no_machine_paths() -> None:
    files = _tracked_text_files()
    assert files, "git ls-files listed no text file"
    hits = [hit for path in files if path not in PENDING for hit in _hits(path)]
    assert not hits, (
        "cite what the outside file said, or point to a file in the repository (docs/architecture.md, "
        "docs/privacy.md, a test); use repository-relative paths:\n" + "\n".join(hits)
    )


def test_pending_exceptions_are_still_needed() -> None:
    stale = [path for path in PENDING if (REPO / path).is_file() and not _hits(path)]
    assert not stale, f"remove from PENDING, they are clean now: {stale}"


@pytest.mark.parametrize(
    ("line", "bad"),
    [
        ("(DESIGN.md, invariant 1)", True),
        ("see reference/flower-1.42.md §12", True),
        ("(mlip-method.md §4.2)", True),
        ("cat ../shared/reference/privacy.md", True),
        ('Path("/work/shared/data/x.csv")', True),
        ("--reports ../shared/data/iu_xray_reports_dev.csv", False),
        ("see docs/privacy.md and docs/architecture.md", False),
        ("a reference: 0.01, 0.1, 1, 10", False),
    ],
)
def test_patterns(line: str, bad: bool) -> None:
    assert bool(CITATION.search(line) or ABSOLUTE.search(line)) is bad
