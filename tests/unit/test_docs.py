"""The documentation's links hold: README.md and docs/**/*.md point only at files that exist, at headings that
exist, and at the code lines that define the symbols they name; the README stays short; and no tracked text
file refers to material outside the repository."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200

# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" is ignored)
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ID = re.compile(r"""<a\s+[^>]*(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
LINE_ANCHOR = re.compile(r"^L(\d+)(?:-L\d+)?$")
SYMBOL = re.compile(r"^`?((?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*))(?:\(\))?`?$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...

# Folders that are never tracked (.gitignore): the scan for outside references skips them (at the top level
# only for the second set: docs/results/reports is tracked, /reports is not).
UNTRACKED_ANYWHERE = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "wandb",
                      "lightning_logs"}
UNTRACKED_AT_TOP = {"checkpoints", "runs", "reports", "wheels", "gpu_check", ".gpu_check", ".data"}
# Assembled from parts, so this file does not match its own search.
OUTSIDE_REFERENCE = re.compile("|".join([r"\.\./" + "shared", "IDQL" + "_SPEC", "DESIGN" + r"\.md"]))


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def visible_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the lines a reader sees rendered: no fenced code blocks, no HTML comments."""
    in_fence, in_comment = False, False
    for number, line in enumerate(text.splitlines(), start=1):
        if not in_comment and FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        out, rest = "", line
        while rest:
            if in_comment:
                end = rest.find("-->")
                if end < 0:
                    rest = ""
                else:
                    in_comment, rest = False, rest[end + 3:]
            else:
                start = rest.find("<!--")
                if start < 0:
                    out, rest = out + rest, ""
                else:
                    out, rest, in_comment = out + rest[:start], rest[start + 4:], True
        yield number, out


def blank_code_spans(line: str) -> str:
    """Blank inline code spans, except one that is the whole text of a link (``[`name`](path)`` stays)."""
    def blank(match: re.Match[str]) -> str:
        start, end = match.span()
        if line[start - 1:start] == "[" and line[end:end + 2] == "](":
            return match.group(0)
        return " " * (end - start)

    return re.sub(r"`[^`]*`", blank, line)


def links(path: Path) -> list[tuple[int, str, str]]:
    """(line, link text, target) of every link and image in a Markdown file, outside code and comments."""
    found = []
    for number, line in visible_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(blank_code_spans(line)):
            found.append((number, match.group(2), match.group(3)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file defines: its headings' slugs (repeats get -1, -2, ...) and explicit ids."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    text = path.read_text(encoding="utf-8")
    for _, line in visible_lines(text):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    found.update(HTML_ID.findall(text))
    return found


def defines(line: str, name: str) -> bool:
    """Whether a Python source line defines ``name``: a def, class, or an assignment to it."""
    pattern = rf"^\s*(?:(?:async\s+)?def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*(?::[^=]*)?="
    return re.match(pattern, line) is not None


def check_link(source: Path, text: str, target: str) -> str | None:
    """What is wrong with one link (None: nothing)."""
    if EXTERNAL.match(target):
        return None
    file_part, _, anchor = target.partition("#")
    dest = (source.parent / file_part).resolve() if file_part else source
    where = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
    if not dest.is_relative_to(ROOT):
        return f"{target}: points outside the repository"
    if not dest.exists():
        return f"{target}: {where} does not exist"
    if not anchor:
        return None
    if dest.suffix == ".md":
        return None if anchor in anchors(dest) else f"{target}: no heading '#{anchor}' in {where}"
    line_anchor = LINE_ANCHOR.match(anchor)
    if dest.suffix == ".py" and line_anchor:
        symbol = SYMBOL.match(text.strip())
        if symbol is None:
            return f"{target}: a line link's text must name the symbol defined there (got {text!r})"
        lines = dest.read_text(encoding="utf-8").splitlines()
        number = int(line_anchor.group(1))
        if not 1 <= number <= len(lines):
            return f"{target}: {where} has {len(lines)} lines"
        name = symbol.group(2)
        if not defines(lines[number - 1], name):
            actual = next((i for i, ln in enumerate(lines, start=1) if defines(ln, name)), None)
            hint = f" (it is defined on line {actual})" if actual else ""
            return f"{target}: line {number} of {where} does not define {name}{hint}"
        return None
    return f"{target}: unsupported anchor '#{anchor}' into {where}"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_image_resolves(page: Path) -> None:
    problems = [f"{page.relative_to(ROOT)}:{number}: {error}" for number, text, target in links(page)
                if (error := check_link(page, text, target))]
    assert not problems, "\n".join(problems)


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def tracked_text_files() -> Iterator[Path]:
    """Every file of the repository outside the never-tracked folders, that is text (no NUL byte)."""
    stack = [ROOT]
    while stack:
        folder = stack.pop()
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():  # configs/ links to idql_pl/configs, scanned there
                continue
            if entry.is_dir():
                skipped = entry.name in UNTRACKED_ANYWHERE or entry.name.endswith(".egg-info") or (
                    folder == ROOT and entry.name in UNTRACKED_AT_TOP)
                if not skipped:
                    stack.append(entry)
                continue
            data = entry.read_bytes()
            if b"\0" not in data[:8192]:
                yield entry


def test_no_file_refers_outside_the_repository() -> None:
    hits = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "references to material outside the repository (cite the paper or docs/ instead):\n" + \
        "\n".join(hits)


# ----------------------------------------------------------------------------------- the checker itself
def test_the_checker_catches_broken_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file, a missing heading, a line that does not define the named symbol, and a link text that
    names no symbol are each reported; links in code, code spans and comments are not links."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("import os\n\n\ndef target():\n    pass\nVALUE: int = 3\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top `title`\n\n## Usage: one, two\n<a id=\"custom\"></a>\n"
        "[ok](pkg/mod.py#L4) [`target`](pkg/mod.py#L4) [`VALUE`](pkg/mod.py#L6) [a](#top-title)\n"
        "[b](#usage-one-two) [c](#custom) [web](https://example.org/x) [d](pkg)\n"
        "[missing](nothere.md) [wrong line](pkg/mod.py#L1) [`target`](pkg/mod.py#L1) [h](#nope)\n"
        "`[code](nothere.md)` <!-- [hidden](nothere.md) -->\n```\n[fenced](nothere.md)\n```\n"
    )
    errors = [check_link(page, text, target) for _, text, target in links(page)]
    assert errors[1:8] == [None] * 7  # a symbol's def and assignment, headings, an id, the web, a folder
    assert errors[0] == "pkg/mod.py#L4: line 4 of pkg/mod.py does not define ok"
    assert errors[8] == "nothere.md: nothere.md does not exist"
    assert "must name the symbol defined there (got 'wrong line')" in errors[9]
    assert errors[10] == ("pkg/mod.py#L1: line 1 of pkg/mod.py does not define target"
                          " (it is defined on line 4)")
    assert errors[11] == "#nope: no heading '#nope' in page.md"
    assert len(errors) == 12  # the code span, the comment and the fenced block hold no links


def test_slugs_follow_github() -> None:
    assert slug("Use the policy outside the project") == "use-the-policy-outside-the-project"
    assert slug("Threads and the runtime tweaks") == "threads-and-the-runtime-tweaks"
    assert slug("`compile: true`, bf16 & many agents (K > 1)") == "compile-true-bf16--many-agents-k--1"
