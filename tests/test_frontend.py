"""Every shipped workflow loads and runs in ComfyUI's real frontend (comfyui-frontend-package 1.32.9).

The real server serves its own frontend; Debian's Chromium, driven headless by playwright (set up by
tools/setup.sh; `playwright install` is never run), opens it. The server gets an input folder of its own that
starts empty, as on a stock ComfyUI: the example image the workflows name must be the one the pack copied there
when it loaded. For each workflows/*.json the page loads the
file with `app.loadGraphData`, the test checks that every node type is registered, every Load Image finds its
file in the server's list and no node is red,
swaps in a tiny checkpoint and caps steps the way tests/test_workflows.py does, clicks the Run button,
checks that the prompt the frontend sent equals our own UI->API conversion, and waits in /history for the
image and in the page for its preview. The page's console must stay free of errors beyond the allow-list
below.

Screenshots (1280x800, after the run, previews loaded) go to the test's temporary folder; with
Z2I_UPDATE_SCREENSHOTS=1, or when one is missing, they are also written to docs/screenshots/<stem>.png
(tools/make_thumbnails.py turns those into the template browser's workflows/<stem>.jpg).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from z2i.headless.workflow import FRONTEND_ONLY, ui_to_api
from z2i.tests.helpers import ComfyServer
from z2i.tests.test_workflows import (CAPS, EXAMPLE_IMAGE, SWAPS, WORKFLOWS, _prepare, ensure_tiny_models,
                                      tiny_checkpoint_for)

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = os.environ.get("Z2I_CHROMIUM", "/usr/lib/chromium/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
# Settings seeded into the server's user folder: no first-run templates dialog (modal, ignores Escape), no
# minimap over the graph, no FPS counter, and full detail at any zoom (the screenshots fit whole graphs).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0}

# Console errors every page load of this ComfyUI + frontend prints, workflow or not (measured): files an
# unused user folder does not have, the registry lookups the server's Content-Security-Policy blocks (it sends
# one with --disable-api-nodes; nothing leaves the machine), and one TypeError inside the frontend's bundle.
# Anything else fails the test: a 404 for /extensions/..., /object_info or a node's files, a missing-node
# message, any other page error.
_404 = r"Failed to load resource: the server responded with a status of 404 \(Not Found\) \[https?://[^/]+"
ALLOWED_CONSOLE = [re.compile(p) for p in (
    _404 + r"/(api/userdata/)?user\.css\]$",
    _404 + r"/favicon\.ico\]$",
    _404 + r"/api/userdata\?dir=(workflows|subgraphs)(%2F)?&[^\]]*\]$",
    _404 + r"/api/userdata/comfy\.templates\.json\]$",
    r"^request failed: https?://[^/]+/(api/userdata/)?(user\.css|comfy\.templates\.json) net::ERR_ABORTED$",
    r"^Connecting to 'https://api\.comfy\.org/[^']*' violates the following Content Security Policy directive",
    r"^request failed: https://api\.comfy\.org/\S+ csp$",
    # the frontend's render-mode watcher sets a setting before its definition is registered; the setting
    # store's onChange then reads `.id` of undefined (comfyui-frontend-package 1.32.9, every page load)
    r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange \(",
)]

# Widgets the frontend adds to a node and sends in the prompt although the node's schema has no such input (the
# server drops them): Preview Any's text display (and, frontend 1.3x on ComfyUI 0.8.0, its mode switch).
FRONTEND_WIDGETS = {"PreviewAny": {"preview", "previewMode"}}

READY_JS = """() => !!(window.app && app.vueAppReady && app.graph && app.canvas && window.LiteGraph
    && Object.keys(LiteGraph.registered_node_types).length > 100
    && LiteGraph.registered_node_types['Z2I_DDIMSampler'])"""

LOAD_JS = """async ([wf, name, ckpt, caps, swaps]) => {
    await app.loadGraphData(wf, true, true, name, {});
    const store = app.extensionManager.workflow;  // one tab: this workflow's
    for (const w of [...store.openWorkflows]) if (w !== store.activeWorkflow) await store.closeWorkflow(w);
    const types = [...new Set(wf.nodes.map(n => n.type))];
    const missing = types.filter(t => !LiteGraph.registered_node_types[t]);
    const changed = [];
    for (const node of app.graph.nodes) {
        for (const w of node.widgets || []) {
            if (node.type === 'CheckpointLoaderSimple' && w.name === 'ckpt_name') {
                w.value = ckpt; changed.push([node.id, w.name, ckpt]);
            } else if (swaps[node.type] && w.name in swaps[node.type]) {
                w.value = swaps[node.type][w.name]; changed.push([node.id, w.name, w.value]);
            } else if (w.name in caps && typeof w.value === 'number' && w.value > caps[w.name]) {
                w.value = caps[w.name]; changed.push([node.id, w.name, w.value]);
            }
        }
    }
    app.graph.setDirtyCanvas(true, true);
    // a Load Image whose file is not in the server's input list runs red: list the value and the options
    const images = app.graph.nodes.filter(n => n.type === 'LoadImage').map(n => {
        const w = n.widgets.find(w => w.name === 'image');
        return [n.id, w.value, (w.options && w.options.values) || []];
    });
    return {
        missing, changed, images,
        loaded: app.graph.nodes.map(n => n.type),
        errors: app.graph.nodes.filter(n => n.has_errors).map(n => [n.id, n.type]),
    };
}"""

# Fit the whole graph into the part of the canvas that the side bar, the tab bar, the Run button with its
# queue overlay and the zoom controls leave free (screen = (graph + offset) * scale).
FIT_JS = """([left, top, right, bottom]) => {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph.nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const ds = app.canvas.ds, W = window.innerWidth - left - right, H = window.innerHeight - top - bottom;
    const scale = Math.min(W / (x1 - x0), H / (y1 - y0), 1);
    ds.scale = scale;
    ds.offset[0] = (left + (W - (x1 - x0) * scale) / 2) / scale - x0;
    ds.offset[1] = (top + (H - (y1 - y0) * scale) / 2) / scale - y0;
    app.canvas.setDirty(true, true);
    return scale;
}"""
FIT_MARGINS = [70, 130, 25, 75]

PREVIEWS_JS = """() => {
    const outs = app.graph.nodes.filter(n => n.type === 'SaveImage');
    return outs.length > 0 && outs.every(n => n.imgs && n.imgs.length
        && n.imgs.every(i => i.complete && i.naturalWidth > 0));
}"""


def _wait(page, js: str, timeout: float, what: str, arg=None):
    try:
        page.wait_for_function(js, arg=arg, timeout=timeout * 1000, polling=200)
    except Exception as e:  # playwright's TimeoutError
        raise AssertionError(f"{what} not reached after {timeout:.0f}s: {e}") from None


def _unexpected(messages: list[str]) -> list[str]:
    return [m for m in messages if not any(p.search(m) for p in ALLOWED_CONSOLE)]


@pytest.fixture(scope="module")
def frontend_server(tmp_path_factory, host):
    """The real server with a user folder and an input folder of its own; the input folder does not exist before
    the start (a stock ComfyUI's fresh one): whatever is in it afterwards, the server or the pack put there."""
    from z2i.headless.host import find_host
    ensure_tiny_models(host)  # the tiny BLIP and saved direction the swaps name (host models folders)
    out = tmp_path_factory.mktemp("frontend_server")
    srv = ComfyServer(find_host(), out / "output", user_dir=out / "user", settings=SETTINGS,
                      extra_args=["--input-directory", str((out / "input").resolve())])
    srv.input_dir = out / "input"
    assert not srv.input_dir.exists()
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.server
def test_the_input_image_came_from_the_pack(frontend_server):
    """The server started with an empty input folder; the pack copied its example image in when it loaded (nothing
    else did: tools/setup.sh no longer writes one), and the server lists it for Load Image."""
    copied = frontend_server.input_dir / EXAMPLE_IMAGE.name
    assert copied.is_file(), f"the pack did not copy {EXAMPLE_IMAGE.name} into the input folder"
    assert copied.read_bytes() == EXAMPLE_IMAGE.read_bytes(), "the input image is not the one the pack ships"
    files = sorted(p.name for p in frontend_server.input_dir.rglob("*") if p.is_file())
    assert files == [EXAMPLE_IMAGE.name], files
    options = frontend_server.get_json("/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]
    assert EXAMPLE_IMAGE.name in options


@pytest.fixture(scope="module")
def page(frontend_server):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: run tools/setup.sh (it apt-installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        # the "Nodes 2.0" banner over the canvas
        context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        pg = context.new_page()
        pg.z2i_console = []  # every console error, page error and failed request, as text
        pg.on("console", lambda m: m.type == "error" and pg.z2i_console.append(
            f"{m.text} [{m.location.get('url', '')}]"))
        pg.on("pageerror", lambda e: pg.z2i_console.append(f"{e.name}: {e.message}"))
        pg.on("requestfailed", lambda r: pg.z2i_console.append(f"request failed: {r.url} {r.failure}"))
        pg.goto(frontend_server.url + "/", wait_until="domcontentloaded", timeout=60_000)
        _wait(pg, READY_JS, 90, "the frontend's app with the node types registered")
        pg.wait_for_timeout(500)  # the deferred extension setup of a fresh page
        unexpected = _unexpected(pg.z2i_console)
        assert not unexpected, "the bare page logged errors:\n" + "\n".join(unexpected)
        yield pg
        context.close()
        browser.close()


def finished_prompt(server, pid: str, timeout: float = 600) -> dict:
    """Wait for prompt `pid` in the server's /history; assert it succeeded (and the server lives); its entry."""
    deadline = time.time() + timeout
    while True:
        hist = server.get_json(f"/history/{pid}")
        if pid in hist:
            break
        assert server.proc.poll() is None, "server died:\n" + server.log_tail()
        assert time.time() < deadline, f"prompt {pid} not finished:\n{server.log_tail()}"
        time.sleep(0.5)
    status = hist[pid].get("status", {})
    assert status.get("status_str") == "success", json.dumps(status)[:4000]
    return hist[pid]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_a_thumbnail(path):
    """The template browser shows workflows/<stem>.jpg beside workflows/<stem>.json (tools/make_thumbnails.py)."""
    jpg = path.with_suffix(".jpg")
    assert jpg.is_file(), f"no {jpg.name}: run tests/test_frontend.py, then tools/make_thumbnails.py"
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff", f"{jpg.name} is not a JPEG"
    assert (SCREENSHOTS / f"{path.stem}.png").is_file(), f"no docs/screenshots/{path.stem}.png"


@pytest.mark.server
@pytest.mark.frontend
def test_frontend_serves_the_pack_templates(frontend_server, page):
    """The template browser lists this pack's workflows (the folder is workflows/) and their thumbnails."""
    templates = frontend_server.get_json("/api/workflow_templates")
    assert sorted(templates.get("z2i", [])) == sorted(p.stem for p in WORKFLOWS)
    for p in WORKFLOWS:
        assert frontend_server.get_bytes(f"/api/workflow_templates/z2i/{p.stem}.jpg")[:3] == b"\xff\xd8\xff"
    assert page.evaluate("() => typeof app.queuePrompt === 'function' && typeof app.loadGraphData === 'function'")


@pytest.mark.server
@pytest.mark.frontend
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_in_the_frontend(frontend_server, page, path, tmp_path):
    wf = json.loads(path.read_text())
    ckpt = tiny_checkpoint_for(path)
    page.z2i_console.clear()

    res = page.evaluate(LOAD_JS, [wf, path.stem, ckpt, CAPS, SWAPS])
    assert not res["missing"], f"node types the frontend does not know: {res['missing']}"
    info = frontend_server.get_json("/object_info")
    server_missing = {n["type"] for n in wf["nodes"]} - FRONTEND_ONLY - set(info)
    assert not server_missing, f"node types the server does not know: {sorted(server_missing)}"
    assert sorted(res["loaded"]) == sorted(n["type"] for n in wf["nodes"]), "the page dropped nodes"
    assert not res["errors"], f"nodes marked red after loading: {res['errors']}"
    assert res["images"], "every workflow loads an image"
    for nid, value, options in res["images"]:
        assert value == EXAMPLE_IMAGE.name and value in options, \
            f"Load Image {nid}: {value!r} is not in the server's input list {options} (it would run red)"
    assert any(c[1] == "ckpt_name" for c in res["changed"]), res["changed"]

    page.evaluate(FIT_JS, FIT_MARGINS)  # on screen, so that the canvas draws the previews when they come

    # Queue with the page's Run button (it calls app.queuePrompt); the prompt id comes from its POST /prompt.
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt"),
                              timeout=60_000) as posted:
        page.click('[data-testid="queue-button"]', timeout=30_000)
    resp = posted.value
    assert resp.ok, f"POST /prompt -> {resp.status}: {resp.text()[:2000]}"
    pid = resp.json()["prompt_id"]

    # The frontend's own graphToPrompt must agree with our Python port (z2i.headless.workflow).
    sent = resp.request.post_data_json["prompt"]
    expected = _prepare(ui_to_api(wf, lambda t: info[t]["input"], set(info)), path)
    assert {k: v["class_type"] for k, v in sent.items()} == {k: v["class_type"] for k, v in expected.items()}
    for k, node in expected.items():
        got = {n: v for n, v in sent[k]["inputs"].items() if n not in FRONTEND_WIDGETS.get(node["class_type"], ())}
        assert got == node["inputs"], f"node {k} ({node['class_type']}): frontend vs ui_to_api"

    hist = {pid: finished_prompt(frontend_server, pid)}
    images = [img for out in hist[pid]["outputs"].values() for img in out.get("images", [])]
    assert images, "the workflow produced no image"
    data = frontend_server.get_bytes(f"/view?filename={images[0]['filename']}"
                                     f"&subfolder={images[0]['subfolder']}&type={images[0]['type']}")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"

    _wait(page, PREVIEWS_JS, 60, "the SaveImage previews in the page")
    red = page.evaluate("() => app.graph.nodes.filter(n => n.has_errors).map(n => [n.id, n.type])")
    assert red == [], f"nodes marked red after the run: {red}"
    page.evaluate(FIT_JS, FIT_MARGINS)
    page.wait_for_timeout(300)
    shot = tmp_path / f"{path.stem}.png"
    page.screenshot(path=str(shot))
    target = SCREENSHOTS / f"{path.stem}.png"
    if os.environ.get("Z2I_UPDATE_SCREENSHOTS") == "1" or not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    unexpected = _unexpected(page.z2i_console)
    assert not unexpected, "the page logged errors:\n" + "\n".join(unexpected)
