"""Every Z2I node has a help page, and ComfyUI's real frontend shows it where a user asks for it.

How the frontend finds a custom node's help (comfyui-frontend-package 1.32.9 and 1.35.9, NodeHelpService):
the pack id is the second part of the node's `python_module` ("custom_nodes.z2i" -> "z2i"), and the page is
fetched from `/extensions/<pack>/docs/<node id>/<locale>.md`, falling back to `/extensions/<pack>/docs/<node
id>.md` (1.35.9 also rejects an answer served as text/html). The server serves `/extensions/<pack>/` from the
pack's registered web folder; Z2I's pages are web/docs/<node id>.md, one file for every locale (the first,
per-locale request is an expected 404).

A user opens the page by selecting the node and pressing the info button of the selection toolbox: 1.32.9
opens it in the node library side bar, 1.35.9 in the right-hand panel's Info tab. The test does exactly that
in headless Chromium for every Z2I node and checks that the page's own text is shown, then saves a screenshot
of DDIM Inversion's page (docs/screenshots/help_page.png, written when missing or with
Z2I_UPDATE_SCREENSHOTS=1; always to the test's temporary folder).
"""
from __future__ import annotations

import os
import re
import shutil
import urllib.error
from pathlib import Path

import pytest

from z2i.tests.test_frontend import (_404, SCREENSHOTS, VIEWPORT, _unexpected, _wait,  # noqa: F401
                                     frontend_server, page)

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "web" / "docs"
SCREENSHOT_NODE = "Z2I_DDIMInversion"
# the frontend asks for the page in the UI's locale first (Z2I ships one page per node for every locale): a 404,
# and, as the frontend never reads that answer's body, Chromium reports the request aborted
_LOCALE_PAGE = r"/extensions/[^/]+/docs/Z2I_\w+/[\w-]+\.md"
LOCALE_MISS = [re.compile(_404 + _LOCALE_PAGE + r"\]$"),
               re.compile(r"^request failed: https?://[^/]+" + _LOCALE_PAGE + r" net::ERR_ABORTED$")]
NOT_SERVED = ("the server does not serve the pack's web folder (web/docs is the help pages' home): "
              "pyproject.toml needs `web = \"web\"` under [tool.comfy]")

ADD_AND_LOCATE_JS = """([type, x]) => {
    app.graph.clear();
    const node = LiteGraph.createNode(type);
    node.pos = [x, 170];
    app.graph.add(node);
    const ds = app.canvas.ds;
    ds.scale = 1; ds.offset[0] = 0; ds.offset[1] = 0;
    app.canvas.deselectAll();
    app.canvas.draw(true, true);          // lays the node out now: hit-testing uses the drawn bounds
    const box = app.canvas.canvas.getBoundingClientRect();
    // the middle of the node's title bar, in page coordinates (screen = (graph + offset) * scale)
    return [box.left + (node.pos[0] + node.size[0] / 2 + ds.offset[0]) * ds.scale,
            box.top + (node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2 + ds.offset[1]) * ds.scale];
}"""

SELECTED_JS = """([type]) => {
    const sel = Object.values(app.canvas.selected_nodes || {});
    return sel.length === 1 && sel[0].type === type;
}"""

# the splitter between the help panel and the canvas (1.32.9: left side bar; 1.35.9: right-hand panel)
GUTTER_JS = """() => [...document.querySelectorAll('.p-splitter-gutter')].map(g => g.getBoundingClientRect())
    .filter(r => r.width > 0 && r.height > 300).map(r => [r.left + r.width / 2, r.top + r.height / 2])"""

# centre the (only) node in the canvas area the panel leaves free
CENTRE_JS = """([left, right]) => {
    const node = app.graph.nodes[0], ds = app.canvas.ds;
    ds.offset[0] = (left + right) / 2 / ds.scale - (node.pos[0] + node.size[0] / 2);
    app.canvas.setDirty(true, true);
}"""

SHOWN_JS = """([snippet]) => [...document.querySelectorAll('.markdown-content')].some(
    e => e.offsetParent !== null && e.innerText.replace(/\\s+/g, ' ').includes(snippet))"""


def _plain(markdown: str) -> str:
    """Markdown inline text as the page shows it: no emphasis or code marks, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[*`]", "", markdown)).strip()


def page_snippets(path: Path) -> tuple[str, str]:
    """(title, first sentence of the opening paragraph) of a help page, as rendered text."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{path.name}: the page must open with '# <node title>'"
    para = []
    for line in lines[1:]:
        if line.strip():
            para.append(line)
        elif para:
            break
    text = _plain(" ".join(para))
    return _plain(lines[0][2:]), re.split(r"(?<=[.:])\s", text, maxsplit=1)[0]


def z2i_nodes(server) -> dict[str, dict]:
    info = server.get_json("/object_info")
    nodes = {k: v for k, v in info.items() if k.startswith("Z2I_")}
    assert len(nodes) >= 20, sorted(nodes)
    return nodes


def help_url(node: dict) -> str:
    """The fallback URL the frontend fetches for a custom node's help (see the module docstring)."""
    parts = node["python_module"].split(".")
    assert len(parts) >= 2 and parts[0] == "custom_nodes", node["python_module"]
    return f"/extensions/{parts[1].split('@')[0]}/docs/{node['name']}.md"


@pytest.mark.server
def test_every_node_has_a_served_help_page(frontend_server):
    nodes = z2i_nodes(frontend_server)
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages == set(nodes), (f"help pages without a node: {sorted(pages - set(nodes))}; "
                                 f"nodes without a help page (web/docs/<id>.md): {sorted(set(nodes) - pages)}")
    for name, node in sorted(nodes.items()):
        title, _ = page_snippets(DOCS / f"{name}.md")
        assert title == node["display_name"], f"{name}.md: title {title!r}, node {node['display_name']!r}"
        try:
            served = frontend_server.get_bytes(help_url(node)).decode("utf-8")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"GET {help_url(node)} -> {e.code}: {NOT_SERVED}") from None
        assert served == (DOCS / f"{name}.md").read_text(encoding="utf-8")
        assert not served.lstrip().startswith("<"), "served as HTML (the frontend would reject it)"


@pytest.mark.server
@pytest.mark.frontend
def test_help_page_opens_from_the_selection_toolbox(frontend_server, page, tmp_path):
    nodes = z2i_nodes(frontend_server)
    try:
        frontend_server.get_bytes(help_url(nodes[SCREENSHOT_NODE]))
    except urllib.error.HTTPError as e:
        raise AssertionError(f"GET {help_url(nodes[SCREENSHOT_NODE])} -> {e.code}: {NOT_SERVED}") from None
    page.z2i_console.clear()
    names = sorted(nodes, key=lambda n: n == SCREENSHOT_NODE)       # the screenshot's node last: it stays open
    for i, name in enumerate(names):
        # alternate the spot, so that two quick clicks in a row never read as a double click on a title
        x, y = page.evaluate(ADD_AND_LOCATE_JS, [name, 380 + 160 * (i % 2)])
        page.mouse.click(x, y)                                       # select it as a user does
        try:
            _wait(page, SELECTED_JS, 10, f"{name} selected by a click on its title", [name])
        except AssertionError:
            page.screenshot(path=str(tmp_path / f"not_selected_{name}.png"))
            raise
        info = page.locator('[data-testid="info-button"]')
        info.wait_for(state="visible", timeout=10_000)
        info.click()
        title, first = page_snippets(DOCS / f"{name}.md")
        for snippet in (title, first):
            _wait(page, SHOWN_JS, 15, f"{name}'s help page text {snippet!r} on screen", [snippet])

    # for the screenshot: widen the help panel by dragging its splitter, as a reader would, and bring the node
    # into the free part of the canvas
    gutters = page.evaluate(GUTTER_JS)
    assert len(gutters) == 1, f"expected one panel splitter on screen, found {gutters}"
    gx, gy = gutters[0]
    panel_left = gx < VIEWPORT["width"] / 2
    page.mouse.move(gx, gy)
    page.mouse.down()
    page.mouse.move(gx + (230 if panel_left else -230), gy, steps=10)
    page.mouse.up()
    (moved, _), = page.evaluate(GUTTER_JS)
    assert abs(moved - gx) > 150, f"the help panel did not widen (splitter at {gx:.0f}, then {moved:.0f})"
    page.evaluate(CENTRE_JS, [moved, VIEWPORT["width"]] if panel_left else [60, moved])
    title, _ = page_snippets(DOCS / f"{SCREENSHOT_NODE}.md")
    _wait(page, SHOWN_JS, 15, f"{SCREENSHOT_NODE}'s help page text still on screen", [title])
    page.wait_for_timeout(300)
    shot = tmp_path / "help_page.png"
    page.screenshot(path=str(shot))
    target = SCREENSHOTS / "help_page.png"
    if os.environ.get("Z2I_UPDATE_SCREENSHOTS") == "1" or not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    unexpected = [m for m in _unexpected(page.z2i_console) if not any(p.search(m) for p in LOCALE_MISS)]
    assert not unexpected, "the page logged errors:\n" + "\n".join(unexpected)
