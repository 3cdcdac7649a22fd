"""The README and bench/RESULTS.md point at files, headings and scripts that exist: a renamed
script or a moved section otherwise leaves a reader with a dead link or a command that fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "RESULTS.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# scripts and committed results (a results path without a suffix is a bench's --out prefix, and
# bench/results/reproduce/ is written by runs, not committed)
NAMED_FILE = re.compile(
    r"(?<![\w/.-])(bench/[\w/.-]*\.(?:py|sh|md|json|png|csv)"
    r"|(?:pluralfed|coordinator|group_node|scripts)/[\w/.-]*\.py)(?![\w])"
)


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {
        heading_anchor(line.lstrip("#"))
        for line in path.read_text("utf-8").splitlines()
        if line.startswith("#") and not line.startswith("#!")
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_lead_to_files_and_headings_that_exist(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text("utf-8")):
        if re.match(r"[a-z]+://", target):
            continue  # the web: not checked offline
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_scripts_and_results_named_exist(doc: Path) -> None:
    named = set(NAMED_FILE.findall(doc.read_text("utf-8")))
    missing = sorted(
        name
        for name in named
        if not name.startswith("bench/results/reproduce/") and not (ROOT / name).is_file()
    )
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"


def test_heading_anchor_matches_githubs() -> None:
    assert heading_anchor(" Where the README's systems ranges come from") == (
        "where-the-readmes-systems-ranges-come-from"
    )
    assert heading_anchor("Systems: wire format, memory and what gRPC itself needs") == (
        "systems-wire-format-memory-and-what-grpc-itself-needs"
    )


def test_what_is_where_names_every_module() -> None:
    """A newcomer finds each module of the three packages in the README's table (a module added
    without a line there is one they would not know to look for)."""
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## What is where", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+\.py)`", section))
    unnamed = sorted(
        str(path.relative_to(ROOT))
        for package in ("pluralfed", "coordinator", "group_node")
        for path in (ROOT / package).glob("*.py")
        if path.name != "__init__.py" and path.name not in named
    )
    assert not unnamed, f"README's 'What is where' does not name: {unnamed}"
    assert "`commands/`" in section and "`proto/`" in section  # the subfolders, as folders
