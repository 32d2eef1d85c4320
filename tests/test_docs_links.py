"""Every relative link and image in README.md and docs/*.md points at a file that exists, and every anchor at a
heading of its page (GitHub's heading ids)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at the first space (a title may follow) or ")".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def heading_ids(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered ``-1``, ``-2``, ..."""
    ids: set[str] = set()
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").lower()).replace(" ", "-")
        anchor, n = base, 0
        while anchor in ids:
            n += 1
            anchor = f"{base}-{n}"
        ids.add(anchor)
    return ids


def relative_links(text: str) -> list[str]:
    """The link and image targets of a page outside code, leaving out web addresses and mail links."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = [match.group(1) for match in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no such file {file}")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file.read_text()):
            problems.append(f"{target}: no heading with id #{anchor} in {file.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links((ROOT / "README.md").read_text())}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert unlinked == [], "docs pages the README does not link to"


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "there.md").write_text("# A heading, with `code`\n\n## A heading, with `code`\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](../there.md) [ok](../there.md#a-heading-with-code-1) ![ok](../there.md) [web](https://x.org/a)\n"
        "[missing](../gone.md) ![missing](img.png) [bad anchor](../there.md#nowhere) [self](#nowhere)\n"
        "```\n[in code](nothing.md)\n```\n`[inline](nothing.md)`\n"
    )
    assert [p.split(":")[0] for p in broken_links(page)] == ["../gone.md", "img.png", "../there.md#nowhere", "#nowhere"]


def test_readme_test_command_is_what_ci_runs():
    """CI runs the README's test command: the line of `.ci/run` that installs and tests is in a README code block."""
    ci_line = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line)
    blocks = [block.group(0).splitlines() for block in FENCE.finditer((ROOT / "README.md").read_text())]
    assert any(ci_line in block for block in blocks), f"README.md has no code block line {ci_line!r}"
