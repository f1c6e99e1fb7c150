"""The documentation: docs/cli.md is what docs/gen_cli.py writes from the click commands, every relative
link of the Markdown files resolves (file and anchor), and README keeps the test command .ci/run runs."""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python docs/gen_cli.py > docs/cli.md"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    expected = gen_cli.render()
    path = ROOT / "docs" / "cli.md"
    current = path.read_text() if path.exists() else ""
    if current != expected:
        diff = "".join(difflib.unified_diff(current.splitlines(True), expected.splitlines(True), "docs/cli.md", "generated", n=1))
        lines = diff.splitlines()
        shown = "\n".join(lines[:60]) + (f"\n... ({len(lines) - 60} more diff lines)" if len(lines) > 60 else "")
        pytest.fail(f"docs/cli.md is stale (the CLI changed); regenerate it with `{REGENERATE}`:\n{shown}")


_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_TARGET = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with code spans removed."""
    fenced = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match:
            fenced = None if fenced == match.group(1) else fenced or match.group(1)
            continue
        if fenced is None:
            yield number, _CODE_SPAN.sub("", line)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return "".join(c for c in text.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    fenced = None
    for line in path.read_text().splitlines():
        match = _FENCE.match(line)
        if match:
            fenced = None if fenced == match.group(1) else fenced or match.group(1)
            continue
        heading = _HEADING.match(line) if fenced is None else None
        if heading:
            slug = _slug(heading.group(2))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    anchors.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text()))
    return anchors


def _broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for number, line in _prose_lines(path.read_text()):
        targets = _INLINE_TARGET.findall(line) + _REFERENCE.findall(line)
        for target in targets:
            if _SCHEME.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where} (no heading with anchor #{anchor} in {resolved.relative_to(root)})")
    return broken


def test_relative_links_resolve():
    files = _markdown_files()
    assert len(files) > 3
    broken = [problem for path in files for problem in _broken_links(path)]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## `onnx-neq train`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Probe: a page\n\n[ok](#probe-a-page) [bad](#nope) [gone](no-such-file.md) `[code](ignored.md)` [web](https://example.org)\n"
        "```\n[fenced](ignored-too.md)\n```\n[cli](other.md#onnx-neq-train) [second](other.md#twice-1) [third](other.md#twice-2)\n"
        "![image](missing.png)\n[ref]: missing-ref.md\n"
    )
    problems = _broken_links(page, root=tmp_path)
    assert [p.split(": ", 1)[1].split(" ")[0] for p in problems] == [
        "#nope",
        "no-such-file.md",
        "other.md#twice-2",
        "missing.png",
        "missing-ref.md",
    ]


def test_readme_keeps_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if line.startswith("# The test command from README.md, verbatim"))
    command = ci[marker + 1].strip()
    assert command and command in (ROOT / "README.md").read_text(), f".ci/run runs {command!r}, which README.md no longer shows"
