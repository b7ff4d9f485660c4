"""Subgraphs (issue 16): a workflow saved by the real frontend with `definitions.subgraphs` runs headless.

The test data in tests/data/ was made by the real frontend (comfyui-frontend-package 1.32.9 on the 0.3.75
host) by `test_frontend_makes_and_runs_a_subgraph_workflow` below. In headless Chromium it loads
workflows/z2i_ddim_img2img.json and, with the frontend's own API only (canvas selection and the
"Convert Selection to Subgraph" command, a subgraph input connected to an inner widget the way a drag onto
the input node does it, `properties.proxyWidgets`, `clone()`), builds:

- subgraph "Sampling" from the DDIM sampler, BasicScheduler and SamplerCustom; the scheduler's `steps` is
  promoted to a widget on the instance (set to 3 there) and its `denoise` shown as a proxy widget;
- a second instance of "Sampling" at the root with steps 2, feeding its own VAE Decode and Save Image;
- subgraph "Sample and decode" from the first instance (so nested), the VAE Decode, a bypassed
  ImageScaleBy in front of the Save Image and a muted PreviewImage.

It writes
  subgraph_ddim_img2img.json           app.graph.serialize(): what the Save command writes;
  subgraph_ddim_img2img.exported.json  graphToPrompt()'s workflow: what Export and the PNG metadata carry
                                       (unlinked widget-input slots dropped, links renumbered);
  subgraph_ddim_img2img.api.json       graphToPrompt()'s prompt: what the Run button POSTs;
then swaps in the tiny checkpoint, presses Run and checks the POSTed prompt and the result. Regenerate with

    Z2I_UPDATE_SUBGRAPH_DATA=1 PYTHONPATH=$PWD/.host/pythonpath HF_HUB_OFFLINE=1 \\
        .venv/bin/python -m pytest tests/test_subgraphs.py -q -p no:cacheprovider -m frontend

on the default (0.3.75) host. On any host (tools/test-host.sh) the same test checks that host's frontend
against ui_to_api live, without writing anything.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest

from z2i.headless.workflow import MissingSubgraph, UnknownNodeTypes, WorkflowError, ui_to_api
from z2i.tests.test_frontend import _unexpected, finished_prompt, frontend_server, page  # noqa: F401  (fixtures)
from z2i.tests.test_workflows import _prepare

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SOURCE = REPO / "workflows" / "z2i_ddim_img2img.json"
SAVED = DATA / "subgraph_ddim_img2img.json"
EXPORTED = DATA / "subgraph_ddim_img2img.exported.json"
API = DATA / "subgraph_ddim_img2img.api.json"

BUILD_JS = """async ([wf, name]) => {
    const sleep = ms => new Promise(r => setTimeout(r, ms));
    await app.loadGraphData(wf, true, true, name, {});
    const store = app.extensionManager.workflow;  // one tab: this workflow's
    for (const w of [...store.openWorkflows]) if (w !== store.activeWorkflow) await store.closeWorkflow(w);
    const root = app.graph;
    const node = id => root.getNodeById(id);
    const add = (type, pos) => { const n = LiteGraph.createNode(type); root.add(n); n.pos = pos; return n; };
    const convert = async nodes => {
        const before = new Set(root.nodes.map(n => n.id));
        app.canvas.deselectAll();
        for (const n of nodes) app.canvas.select(n);
        await app.extensionManager.command.execute('Comfy.Graph.ConvertToSubgraph');
        await sleep(100);
        const made = root.nodes.filter(n => !before.has(n.id) && n.isSubgraphNode?.());
        if (made.length !== 1) throw new Error(`the conversion made ${made.length} subgraph nodes`);
        return made[0];
    };
    const BYPASS = 4, NEVER = 2;
    const ckpt = node(2), decode = node(10), save = node(11);
    const scale = add('ImageScaleBy', [decode.pos[0], decode.pos[1] + 150]);
    decode.connect(0, scale, 0); scale.connect(0, save, 0); scale.mode = BYPASS;
    const preview = add('PreviewImage', [decode.pos[0], decode.pos[1] + 300]);
    decode.connect(0, preview, 0); preview.mode = NEVER;

    const a = await convert([node(7), node(8), node(9)]);
    a.subgraph.name = 'Sampling';
    a.title = 'Sampling';
    const sched = a.subgraph.nodes.find(n => n.type === 'BasicScheduler');
    a.subgraph.inputNode.emptySlot.connect(sched.inputs.find(i => i.name === 'steps'), sched);
    await sleep(50);
    a.widgets.find(w => w.name === 'steps').value = 3;
    a.properties.proxyWidgets = [...a.properties.proxyWidgets, [String(sched.id), 'denoise']];

    const a2 = a.clone();
    root.add(a2);
    a2.pos = [a.pos[0], a.pos[1] + 400];
    for (const [i, inp] of a.inputs.entries()) {
        const link = inp.link == null ? null : root.getLink(inp.link);
        if (link) node(link.origin_id).connect(link.origin_slot, a2, i);
    }
    a2.widgets.find(w => w.name === 'steps').value = 2;
    const decode2 = add('VAEDecode', [a2.pos[0] + 300, a2.pos[1]]);
    const save2 = add('SaveImage', [a2.pos[0] + 600, a2.pos[1]]);
    a2.connect(0, decode2, 0); ckpt.connect(2, decode2, 1); decode2.connect(0, save2, 0);
    save2.widgets.find(w => w.name === 'filename_prefix').value = 'z2i_subgraph_second';

    const b = await convert([a, decode, scale, preview]);
    b.subgraph.name = 'Sample and decode';
    b.title = 'Sample and decode';
    await sleep(200);
    const prompt = await app.graphToPrompt();
    app.graph.setDirtyCanvas(true, true);
    return {workflow: JSON.parse(JSON.stringify(root.serialize())), prompt: prompt.output,
            exported: prompt.workflow, version: prompt.workflow.extra?.frontendVersion,
            ids: {second: a2.id, outer: b.id, save: save.id, decode2: decode2.id, save2: save2.id}};
}"""

# Select root nodes, run the frontend's Bypass or Mute command on them (it sets the mode of every node inside
# a selected subgraph instance too), take what graphToPrompt makes, then the command again (toggles back).
MODE_JS = """async ([ids, command]) => {
    app.canvas.deselectAll();
    for (const id of ids) app.canvas.select(app.graph.getNodeById(id));
    await app.extensionManager.command.execute(command);
    const prompt = await app.graphToPrompt();
    const workflow = JSON.parse(JSON.stringify(app.graph.serialize()));
    await app.extensionManager.command.execute(command);
    app.canvas.deselectAll();
    return {workflow, prompt: prompt.output};
}"""

# The mode of one node set directly (node properties panel, a script), its inner nodes left as they are.
OWN_MODE_JS = """async ([id, mode]) => {
    const n = app.graph.getNodeById(id), before = n.mode;
    n.mode = mode;
    const prompt = await app.graphToPrompt();
    const workflow = JSON.parse(JSON.stringify(app.graph.serialize()));
    n.mode = before;
    return {workflow, prompt: prompt.output};
}"""

SWAP_CKPT_JS = """(ckpt) => {
    const n = app.graph.nodes.find(n => n.type === 'CheckpointLoaderSimple');
    n.widgets.find(w => w.name === 'ckpt_name').value = ckpt;
    return n.id;
}"""


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _differences(ours: dict, theirs: dict) -> list[str]:
    """What differs between two API prompts in node ids, class types and inputs (titles are not compared:
    the frontend writes every node's title into _meta, ui_to_api only the ones the user set)."""
    out = []
    for k in sorted(set(ours) ^ set(theirs)):
        out.append(f"node {k}: only in {'ui_to_api' if k in ours else 'the frontend'}")
    for k in sorted(set(ours) & set(theirs)):
        if ours[k]["class_type"] != theirs[k]["class_type"]:
            out.append(f"node {k}: {ours[k]['class_type']} vs {theirs[k]['class_type']}")
        elif ours[k]["inputs"] != theirs[k]["inputs"]:
            out.append(f"node {k} ({ours[k]['class_type']}): {ours[k]['inputs']} vs {theirs[k]['inputs']}")
    return out


def _convert(wf: dict, host) -> dict:
    return ui_to_api(wf, host.input_types, known_types=set(host.node_classes))


def _set_mode(wf: dict, ids: list, mode: int) -> dict:
    """What the frontend's Bypass/Mute command does to the selected root nodes: the mode goes onto each, and
    onto every node inside a selected subgraph instance, depth first (so into the shared definition)."""
    wf = copy.deepcopy(wf)
    defs = {d["id"]: d for d in wf["definitions"]["subgraphs"]}

    def put(nodes):
        for n in nodes:
            n["mode"] = mode
            if n["type"] in defs:
                put(defs[n["type"]]["nodes"])

    put([n for n in wf["nodes"] if n["id"] in ids])
    return wf


def _instances(wf: dict) -> dict[str, int]:
    names = {d["id"]: d["name"] for d in wf["definitions"]["subgraphs"]}
    return {names[n["type"]]: n["id"] for n in wf["nodes"] if n["type"] in names}


# -- the saved data ---------------------------------------------------------------------------------------------
def test_the_data_holds_nested_subgraphs():
    wf, exported, api = _load(SAVED), _load(EXPORTED), _load(API)
    defs = {d["id"]: d for d in wf["definitions"]["subgraphs"]}
    assert sorted(d["name"] for d in defs.values()) == ["Sample and decode", "Sampling"]
    instances = [n for n in wf["nodes"] if n["type"] in defs]
    assert len(instances) == 2
    nested = [n for d in defs.values() for n in d["nodes"] if n["type"] in defs]
    assert len(nested) == 1, "one instance of 'Sampling' is inside 'Sample and decode'"
    assert exported["extra"]["frontendVersion"]
    assert any(k.count(":") == 2 for k in api), "the frontend's prompt has ids of a nested subgraph's nodes"


@pytest.mark.host
@pytest.mark.parametrize("path", [SAVED, EXPORTED], ids=["saved", "exported"])
def test_saved_subgraph_workflow_converts_to_the_frontend_prompt(host, path):
    api = _load(API)
    ours = _convert(_load(path), host)
    assert not _differences(ours, api), "\n".join(_differences(ours, api))
    # what the subgraph features did: the nested instance's promoted steps (3) and the root instance's (2) each
    # reach their own scheduler, the bypassed ImageScaleBy and the muted PreviewImage are gone
    steps = sorted((k.count(":"), n["inputs"]["steps"]) for k, n in ours.items() if n["class_type"] == "BasicScheduler")
    assert steps == [(1, 2), (2, 3)]
    assert not {"ImageScaleBy", "PreviewImage"} & {n["class_type"] for n in ours.values()}
    saves = [n for n in ours.values() if n["class_type"] == "SaveImage"]
    assert all(n["inputs"]["images"][0] in ours and ours[n["inputs"]["images"][0]]["class_type"] == "VAEDecode"
               for n in saves)


@pytest.mark.host
def test_saved_subgraph_workflow_runs_headless(host):
    prompt = _prepare(_convert(_load(SAVED), host), SOURCE)
    res = host.run_prompt(prompt)
    images = {nid: out["images"] for nid, out in res.ui.items() if out.get("images")}
    assert sorted(n["class_type"] for n in (prompt[k] for k in images)) == ["SaveImage", "SaveImage"]
    for imgs in images.values():
        for img in imgs:
            f = Path(host.folder_paths.get_directory_by_type(img["type"])) / img["subfolder"] / img["filename"]
            assert f.is_file() and f.stat().st_size > 0


@pytest.mark.host
def test_missing_subgraph_definition_is_named(host):
    wf = _load(SAVED)
    gone = next(d for d in wf["definitions"]["subgraphs"] if d["name"] == "Sampling")
    wf["definitions"]["subgraphs"].remove(gone)
    outer = _instances(wf)["Sample and decode"]
    nested = next(n["id"] for d in wf["definitions"]["subgraphs"] for n in d["nodes"] if n["type"] == gone["id"])
    root = next(n["id"] for n in wf["nodes"] if n["type"] == gone["id"])
    expected = f"{gone['id']} (node {root}, {outer}:{nested})"
    with pytest.raises(MissingSubgraph) as e:
        _convert(wf, host)
    assert expected in str(e.value) and "definitions.subgraphs" in str(e.value)
    # without the host's node list (known_types=None) the schema lookup names it the same way
    with pytest.raises(MissingSubgraph, match=gone["id"]):
        ui_to_api(wf, host.input_types)


@pytest.mark.host
def test_unknown_node_inside_a_subgraph_is_named_by_its_path(host):
    wf = _load(SAVED)
    inner = next(d for d in wf["definitions"]["subgraphs"] if d["name"] == "Sampling")
    sampler = next(n for n in inner["nodes"] if n["type"] == "Z2I_DDIMSampler")
    sampler["type"] = "NotARealSampler"
    paths = sorted(k for k, n in _load(API).items() if n["class_type"] == "Z2I_DDIMSampler")
    with pytest.raises(UnknownNodeTypes, match=r"NotARealSampler \(node " + ", ".join(paths) + r"\)"):
        _convert(wf, host)


@pytest.mark.host
def test_bypassed_subgraph_instance_passes_its_input_through(host):
    """Bypassing the root 'Sampling' instance bypasses the nodes of its definition, which the nested instance
    shares (as in the frontend): both decoders then read the VAE-encoded image straight from its latent input."""
    wf = _load(SAVED)
    api = _convert(_set_mode(wf, [_instances(wf)["Sampling"]], 4), host)
    assert {n["class_type"] for n in api.values()} == {
        "CheckpointLoaderSimple", "LoadImage", "CLIPTextEncode", "VAEEncode", "VAEDecode", "SaveImage"}
    encode = next(k for k, n in api.items() if n["class_type"] == "VAEEncode")
    assert [n["inputs"]["samples"] for n in api.values() if n["class_type"] == "VAEDecode"] == [[encode, 0]] * 2


@pytest.mark.host
def test_muted_subgraph_instance_drops_its_nodes(host):
    """Muting "Sample and decode" mutes its nodes and the "Sampling" definition it shares with the second
    instance (as the frontend does): each consumer left without a source is named, and once those are muted
    too only the nodes before the subgraphs remain."""
    wf = _load(SAVED)
    outer = _instances(wf)["Sample and decode"]
    origin = {(link["id"] if isinstance(link, dict) else link[0]):
              (link["origin_id"] if isinstance(link, dict) else link[1]) for link in wf["links"]}
    feeds = {n["id"]: origin.get(n["inputs"][0]["link"]) for n in wf["nodes"] if n.get("inputs")}
    save = next(nid for nid, src in feeds.items() if src == outer)
    decode2 = next(nid for nid, src in feeds.items() if src == _instances(wf)["Sampling"])
    save2 = next(nid for nid, src in feeds.items() if src == decode2)
    with pytest.raises(WorkflowError, match=rf"node {save} \(SaveImage\): required input 'images' is not connected"):
        _convert(_set_mode(wf, [outer], 2), host)
    with pytest.raises(WorkflowError, match=rf"node {decode2} \(VAEDecode\): required input 'samples'"):
        _convert(_set_mode(wf, [outer, save], 2), host)
    api = _convert(_set_mode(wf, [outer, save, decode2, save2], 2), host)
    assert sorted(n["class_type"] for n in api.values()) == [
        "CLIPTextEncode", "CLIPTextEncode", "CheckpointLoaderSimple", "LoadImage", "VAEEncode"]


@pytest.mark.server
@pytest.mark.frontend
def test_frontend_makes_and_runs_a_subgraph_workflow(frontend_server, page):
    page.z2i_console.clear()
    res = page.evaluate(BUILD_JS, [_load(SOURCE), "z2i_subgraph_ddim_img2img"])
    info = frontend_server.get_json("/object_info")

    def convert(wf):
        return ui_to_api(wf, lambda t: info[t]["input"], set(info))

    for form in ("workflow", "exported"):
        diff = _differences(convert(res[form]), res["prompt"])
        assert not diff, f"frontend {res['version']}, {form} form:\n" + "\n".join(diff)
    assert any(k.count(":") == 2 for k in res["prompt"]), "no nested subgraph node in the frontend's prompt"

    if os.environ.get("Z2I_UPDATE_SUBGRAPH_DATA") == "1" or not SAVED.exists():
        DATA.mkdir(exist_ok=True)
        for path, data in ((SAVED, res["workflow"]), (EXPORTED, res["exported"]), (API, res["prompt"])):
            path.write_text(json.dumps(data, indent=1) + "\n")

    # Run it from the page (tiny checkpoint): the POSTed prompt is ours, and the server runs it.
    page.evaluate(SWAP_CKPT_JS, "z2i-tiny-sd15.safetensors")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt"),
                              timeout=60_000) as posted:
        page.click('[data-testid="queue-button"]', timeout=30_000)
    resp = posted.value
    assert resp.ok, f"POST /prompt -> {resp.status}: {resp.text()[:2000]}"
    sent = resp.request.post_data_json["prompt"]
    expected = _prepare(convert(res["workflow"]), SOURCE, caps={})      # the page swaps the checkpoint only
    assert not _differences(expected, sent), "\n".join(_differences(expected, sent))
    pid = resp.json()["prompt_id"]
    hist = {pid: finished_prompt(frontend_server, pid)}
    images = [img for out in hist[pid]["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 2, images

    # The frontend's own Bypass and Mute commands on root nodes (they set the mode of every node inside a
    # selected subgraph instance too, in the definition its other instances share); ui_to_api of what the page
    # then saves is again what the page would POST. Muting "Sample and decode" and its Save Image mutes the
    # shared "Sampling" nodes, so the second decoder loses its input: the frontend drops it from the prompt
    # (the server then refuses the prompt), ui_to_api says so before anything runs.
    ids = res["ids"]
    bypass, mute = "Comfy.Canvas.ToggleSelectedNodes.Bypass", "Comfy.Canvas.ToggleSelectedNodes.Mute"
    for sel, command, unfed in (([ids["second"]], bypass, None),
                                ([ids["outer"], ids["save"]], mute, ids["decode2"]),
                                ([ids["outer"], ids["save"], ids["decode2"], ids["save2"]], mute, None)):
        moded = page.evaluate(MODE_JS, [sel, command])
        if unfed is not None:
            assert "samples" not in moded["prompt"][str(unfed)]["inputs"]
            with pytest.raises(WorkflowError, match=rf"node {unfed} \(VAEDecode\): required input 'samples'"):
                convert(moded["workflow"])
            continue
        diff = _differences(convert(moded["workflow"]), moded["prompt"])
        assert not diff, f"frontend {res['version']}, {command} on {sel}:\n" + "\n".join(diff)
    # An instance muted on its own (its inner nodes not): the frontend still runs what is inside, and so do we.
    moded = page.evaluate(OWN_MODE_JS, [ids["second"], 2])
    assert any(k.startswith(f"{ids['second']}:") for k in moded["prompt"])
    diff = _differences(convert(moded["workflow"]), moded["prompt"])
    assert not diff, f"frontend {res['version']}, instance {ids['second']} muted on its own:\n" + "\n".join(diff)
    unexpected = _unexpected(page.z2i_console)
    assert not unexpected, "the page logged errors:\n" + "\n".join(unexpected)
