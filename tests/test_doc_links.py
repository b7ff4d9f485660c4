"""The documentation holds together (issue 32, "Docs and tools"). No host, no GPU: plain file reads.

README.md stays a user's page: under 400 lines, with the developer and research material in docs/ pages, and no
stale markers ("(new)", "being added as this README is written") that stop being true the day after they are
written. Every relative Markdown link in README.md, CHANGELOG.md, BENCHMARKS.md, docs/*.md and web/docs/*.md
(the node help pages) points at a file that exists, relative to the linking file, and a link with a #fragment into
a Markdown file names one of its headings by GitHub's anchor for it: lower case, every character other than a
letter, digit, space, hyphen or underscore dropped, spaces turned into hyphens, and -1, -2, ... appended to
repeated headings. Links inside fenced code blocks and inline code are not links; image links are. Every broken
link is reported at once.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 400
STALE = re.compile(r"\(new\)|being added", re.I)

# [text](target) and ![alt](target), with an optional <target> and an optional "title"
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
FENCE = re.compile(r"^(?:\s*>)*\s{0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
ATX_HEADING = re.compile(r"^(?:\s*>)*\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)       # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "BENCHMARKS.md"]
    files += sorted((REPO / "docs").glob("*.md")) + sorted((REPO / "web" / "docs").glob("*.md"))
    return [f for f in files if f.is_file()]


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks, inline code spans blanked if asked."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                    and not line[m.end():].strip():
                fence = None
            continue
        out.append((number, INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line) if blank_code else line))
    return out


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)        # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a Markdown file, plus explicit <a name/id> anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    lines = prose_lines(path.read_text(encoding="utf-8"), blank_code=False)   # code in a heading is in its anchor
    headings = []
    for i, (number, line) in enumerate(lines):
        m = ATX_HEADING.match(line)
        if m:
            headings.append(m.group(1))
        elif SETEXT_UNDERLINE.match(line) and i > 0 and lines[i - 1][0] == number - 1 \
                and lines[i - 1][1].strip() and not ATX_HEADING.match(lines[i - 1][1]):
            headings.append(lines[i - 1][1].strip())
        found.update(HTML_ANCHOR.findall(line))
    for heading in headings:
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        m = REFERENCE_DEF.match(line)
        if m:
            targets.append(m.group(1))
        out += [(number, t[1:-1] if t.startswith("<") else t) for t in targets]
    return out


def broken_links(path: Path, cache: dict[Path, set[str]]) -> list[str]:
    broken = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        where = f"{path.relative_to(REPO)}:{number}: ({target})"
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{where}: no such file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
            continue
        if not fragment or dest.suffix.lower() != ".md" or not dest.is_file():
            continue
        if dest not in cache:
            cache[dest] = anchors(dest)
        if unquote(fragment) not in cache[dest]:
            broken.append(f"{where}: no heading with anchor #{fragment} in {dest.relative_to(REPO)}")
    return broken


def test_github_slugs():
    assert github_slug("SD3 (rectified flow)") == "sd3-rectified-flow"
    assert github_slug("CLIP losses: open_clip weights") == "clip-losses-open_clip-weights"
    assert github_slug("pix2pix-zero (`z2i_pix2pix_zero.json`)") == "pix2pix-zero-z2i_pix2pix_zerojson"
    assert github_slug("Try it / developers") == "try-it--developers"
    assert ATX_HEADING.match("## Notes on C# ##").group(1) == "Notes on C#"


def test_anchors_number_repeated_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## Notes\n\n```\n## Not a heading\n```\n\n## Notes\n\nB b\n---\n\n## Notes\n")
    assert anchors(page) == {"a", "notes", "notes-1", "b-b", "notes-2"}


def test_links_skip_code_and_count_images(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [x](a.md#b) and ![i](img.png).\n\n> ```bash\n> [no](c.md)\n> ```\n\n`[no](d.md)` "
                    "[y](<e f.md>) [z](https://example.com/g.md)\n\n[ref]: h.md\n")
    assert [t for _, t in links(page)] == ["a.md#b", "img.png", "e f.md", "https://example.com/g.md", "h.md"]


def test_readme_is_short_and_has_no_stale_markers():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, (f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} "
                                           "and move reference material into docs/")
    stale = [f"README.md:{n}: {line.strip()}" for n, line in enumerate(lines, 1) if STALE.search(line)]
    assert not stale, "stale markers in README.md:\n" + "\n".join(stale)


def test_every_relative_link_resolves():
    files = doc_files()
    assert README in files and len(files) > 3
    cache: dict[Path, set[str]] = {}
    broken = [b for f in files for b in broken_links(f, cache)]
    assert not broken, f"{len(broken)} broken link(s):\n" + "\n".join(broken)
