"""UI-format -> API-format conversion, checked against the real node schemas of the host."""
import asyncio
import copy

import pytest

from z2i.headless.workflow import UnknownNodeTypes, WorkflowError, ui_to_api

pytestmark = pytest.mark.host


def _node(nid, kind, inputs=(), outputs=(), widgets=(), mode=0, title=None):
    n = {"id": nid, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": nid, "mode": mode,
         "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
         "properties": {}, "widgets_values": list(widgets)}
    if title:
        n["title"] = title
    return n


def ui_graph():
    """A graph as the frontend saves it: a Reroute, a PrimitiveNode driving a widget-input, a seed widget
    followed by its control value, LoadImage's upload value, a bypassed and a muted node, and a Note."""
    nodes = [
        _node(1, "Note", widgets=["read me"]),
        _node(2, "CheckpointLoaderSimple", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1, 2]},
                                                    {"name": "CLIP", "type": "CLIP", "links": [3]},
                                                    {"name": "VAE", "type": "VAE", "links": [4]}],
              widgets=["z2i-tiny-sd15.safetensors"]),
        _node(3, "Reroute", inputs=[{"name": "", "type": "*", "link": 3}],
              outputs=[{"name": "", "type": "CLIP", "links": [5, 6]}]),
        _node(4, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 5}],
              outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [7]}], widgets=["a cat"],
              title="Positive"),
        _node(5, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 6}],
              outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [8]}], widgets=[""]),
        _node(6, "EmptyLatentImage", outputs=[{"name": "LATENT", "type": "LATENT", "links": [9]}],
              widgets=[64, 64, 1]),
        _node(7, "LatentUpscaleBy", inputs=[{"name": "samples", "type": "LATENT", "link": 9}],
              outputs=[{"name": "LATENT", "type": "LATENT", "links": [10]}], widgets=["nearest-exact", 2.0], mode=4),
        _node(8, "Z2I_DDIMSampler", outputs=[{"name": "sampler", "type": "SAMPLER", "links": [11]}], widgets=[0.0]),
        _node(9, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [12],
                                            "widget": {"name": "steps"}}], widgets=[3, "fixed"]),
        _node(10, "BasicScheduler", inputs=[{"name": "model", "type": "MODEL", "link": 1},
                                            {"name": "steps", "type": "INT", "link": 12, "widget": {"name": "steps"}}],
              outputs=[{"name": "SIGMAS", "type": "SIGMAS", "links": [13]}], widgets=["ddim_uniform", 20, 1.0]),
        _node(11, "SamplerCustom", inputs=[
            {"name": "model", "type": "MODEL", "link": 2}, {"name": "positive", "type": "CONDITIONING", "link": 7},
            {"name": "negative", "type": "CONDITIONING", "link": 8}, {"name": "sampler", "type": "SAMPLER", "link": 11},
            {"name": "sigmas", "type": "SIGMAS", "link": 13}, {"name": "latent_image", "type": "LATENT", "link": 10}],
              outputs=[{"name": "output", "type": "LATENT", "links": [14]},
                       {"name": "denoised_output", "type": "LATENT", "links": []}],
              widgets=[True, 77, "fixed", 1.5]),
        _node(12, "VAEDecode", inputs=[{"name": "samples", "type": "LATENT", "link": 14},
                                       {"name": "vae", "type": "VAE", "link": 4}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [15]}]),
        _node(13, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 15}], widgets=["conv"]),
        _node(14, "LoadImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": []},
                                        {"name": "MASK", "type": "MASK", "links": []}],
              widgets=["z2i_example.png", "image"], mode=2),
    ]
    links = [[1, 2, 0, 10, 0, "MODEL"], [2, 2, 0, 11, 0, "MODEL"], [3, 2, 1, 3, 0, "CLIP"], [4, 2, 2, 12, 1, "VAE"],
             [5, 3, 0, 4, 0, "CLIP"], [6, 3, 0, 5, 0, "CLIP"], [7, 4, 0, 11, 1, "CONDITIONING"],
             [8, 5, 0, 11, 2, "CONDITIONING"], [9, 6, 0, 7, 0, "LATENT"], [10, 7, 0, 11, 5, "LATENT"],
             [11, 8, 0, 11, 3, "SAMPLER"], [12, 9, 0, 10, 1, "INT"], [13, 10, 0, 11, 4, "SIGMAS"],
             [14, 11, 0, 12, 0, "LATENT"], [15, 12, 0, 13, 0, "IMAGE"]]
    return {"last_node_id": 14, "last_link_id": 15, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_converts_frontend_constructs(host):
    api = ui_to_api(ui_graph(), host.input_types, known_types=set(host.node_classes))
    assert set(api) == {"2", "4", "5", "6", "8", "10", "11", "12", "13"}  # Note/Reroute/Primitive/bypass/muted gone
    assert api["4"]["inputs"] == {"text": "a cat", "clip": ["2", 1]}           # through the Reroute
    assert api["4"]["_meta"]["title"] == "Positive"
    assert api["10"]["inputs"] == {"model": ["2", 0], "scheduler": "ddim_uniform", "steps": 3, "denoise": 1.0}
    assert api["11"]["inputs"]["noise_seed"] == 77 and api["11"]["inputs"]["cfg"] == 1.5  # "fixed" skipped
    assert api["11"]["inputs"]["latent_image"] == ["6", 0]                  # bypassed upscale passes through
    import execution
    ok, err, outs, node_errors = asyncio.run(execution.validate_prompt("t", api, None))
    assert ok, (err, node_errors)
    res = host.run_prompt(api)
    assert res.ui["13"]["images"]


def test_load_image_upload_value_is_skipped(host):
    g = ui_graph()
    g["nodes"][-1]["mode"] = 0
    api = ui_to_api(g, host.input_types, known_types=set(host.node_classes))
    assert api["14"]["inputs"] == {"image": "z2i_example.png"}


def test_unknown_node_type_is_named(host):
    g = ui_graph()
    g["nodes"].append(_node(20, "SomePackNode", widgets=[1]))
    with pytest.raises(UnknownNodeTypes, match=r"SomePackNode \(node 20\)"):
        ui_to_api(g, host.input_types, known_types=set(host.node_classes))


def test_unconnected_required_input_is_named(host):
    g = ui_graph()
    g["nodes"][11]["inputs"][0]["link"] = None  # VAEDecode.samples
    with pytest.raises(WorkflowError, match=r"node 12 \(VAEDecode\).*samples"):
        ui_to_api(g, host.input_types)


def test_missing_link_row_is_an_error(host):
    g = copy.deepcopy(ui_graph())
    g["links"] = [link for link in g["links"] if link[0] != 15]
    with pytest.raises(WorkflowError, match="link 15"):
        ui_to_api(g, host.input_types)


def test_api_format_passes_through(host):
    api = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    assert ui_to_api(api, host.input_types) is api


# -- subgraphs (hand-made; tests/test_subgraphs.py has one the real frontend made) --------------------------
RESIZE, OUTER = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"


def _link(lid, src, sslot, dst, dslot, typ):
    return {"id": lid, "origin_id": src, "origin_slot": sslot, "target_id": dst, "target_slot": dslot, "type": typ}


def resize_subgraph():
    """Subgraph "Resize": LatentUpscale with samples, width and height from the subgraph's inputs (width and
    height are widget inputs, so they become widgets on an instance); output 0 is the upscale, output 1 is the
    samples input passed straight through."""
    return {
        "id": RESIZE, "name": "Resize", "version": 1,
        "inputNode": {"id": -10, "bounding": [0, 0, 75, 100]}, "outputNode": {"id": -20, "bounding": [0, 0, 75, 100]},
        "inputs": [{"id": "i0", "name": "samples", "type": "LATENT", "linkIds": [1, 5]},
                   {"id": "i1", "name": "width", "type": "INT", "linkIds": [2]},
                   {"id": "i2", "name": "height", "type": "INT", "linkIds": [3]}],
        "outputs": [{"id": "o0", "name": "LATENT", "type": "LATENT", "linkIds": [4]},
                    {"id": "o1", "name": "same", "type": "LATENT", "linkIds": [5]}],
        "widgets": [],
        "nodes": [_node(1, "LatentUpscale", inputs=[
            {"name": "samples", "type": "LATENT", "link": 1},
            {"name": "width", "type": "INT", "link": 2, "widget": {"name": "width"}},
            {"name": "height", "type": "INT", "link": 3, "widget": {"name": "height"}}],
            outputs=[{"name": "LATENT", "type": "LATENT", "links": [4]}],
            widgets=["nearest-exact", 96, 80, "disabled"])],
        "links": [_link(1, -10, 0, 1, 0, "LATENT"), _link(2, -10, 1, 1, 1, "INT"), _link(3, -10, 2, 1, 2, "INT"),
                  _link(4, 1, 0, -20, 0, "LATENT"), _link(5, -10, 0, -20, 1, "LATENT")],
    }


def _instance(nid, sid, inputs, outputs, widgets=(), props=None, mode=0):
    n = _node(nid, sid, inputs=inputs, outputs=outputs, widgets=widgets, mode=mode)
    n["properties"] = dict(props or {})
    return n


def _resize_inputs(samples_link):  # (an instance's input slots: samples linked, widgets unlinked)
    return [{"name": "samples", "type": "LATENT", "link": samples_link},
            {"name": "width", "type": "INT", "link": None, "widget": {"name": "width"}},
            {"name": "height", "type": "INT", "link": None, "widget": {"name": "height"}}]


def subgraph_workflow(widgets=(128, 112), props=None):
    nodes = [
        _node(1, "EmptyLatentImage", outputs=[{"name": "LATENT", "type": "LATENT", "links": [1]}], widgets=[64, 64, 1]),
        _instance(2, RESIZE, inputs=_resize_inputs(1),
                  outputs=[{"name": "LATENT", "type": "LATENT", "links": [2]},
                           {"name": "same", "type": "LATENT", "links": [3]}], widgets=widgets, props=props),
        _node(3, "LatentUpscaleBy", inputs=[{"name": "samples", "type": "LATENT", "link": 2}],
              outputs=[{"name": "LATENT", "type": "LATENT", "links": []}], widgets=["nearest-exact", 1.5]),
        _node(4, "LatentUpscaleBy", inputs=[{"name": "samples", "type": "LATENT", "link": 3}],
              outputs=[{"name": "LATENT", "type": "LATENT", "links": []}], widgets=["bilinear", 2.0]),
    ]
    links = [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "LATENT"], [3, 2, 1, 4, 0, "LATENT"]]
    return {"last_node_id": 4, "last_link_id": 3, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4, "definitions": {"subgraphs": [resize_subgraph()]}}


def test_subgraph_instance_is_expanded(host):
    api = ui_to_api(subgraph_workflow(), host.input_types, known_types=set(host.node_classes))
    assert set(api) == {"1", "2:1", "3", "4"}
    assert api["2:1"] == {"class_type": "LatentUpscale", "inputs": {
        "upscale_method": "nearest-exact", "width": 128, "height": 112, "crop": "disabled", "samples": ["1", 0]}}
    assert api["3"]["inputs"]["samples"] == ["2:1", 0]
    assert api["4"]["inputs"]["samples"] == ["1", 0]          # subgraph input wired straight to an output
    import execution
    ok, err, _outs, node_errors = asyncio.run(execution.validate_prompt("t", {
        **api, "9": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["8", 2]}},
        "8": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "z2i-tiny-sd15.safetensors"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "sg"}}}, None))
    assert ok, (err, node_errors)


@pytest.mark.parametrize("widgets, props, expected", [
    ((128, 112), None, (128, 112)),                                                 # one value per promoted input
    ((None, 112, 128), {"proxyWidgets": [["1", "crop"], ["-1", "height"], ["-1", "width"]]}, (128, 112)),
    ((None, 112, 128), {"proxyWidgets": '[["1", "crop"], ["-1", "height"], ["-1", "width"]]'}, (128, 112)),
    ((), None, (96, 80)),                                   # no values: the inner widgets' own
    ((None,), None, (96, 80)),
], ids=["positional", "proxy-order", "proxy-json-string", "none", "null"])
def test_promoted_widget_values(host, widgets, props, expected):
    api = ui_to_api(subgraph_workflow(widgets, props), host.input_types)
    assert (api["2:1"]["inputs"]["width"], api["2:1"]["inputs"]["height"]) == expected


def test_promoted_widget_input_fed_from_outside(host):
    g = subgraph_workflow()
    g["nodes"].append(_node(5, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [4],
                                                          "widget": {"name": "width"}}], widgets=[200, "fixed"]))
    g["nodes"][1]["inputs"][1]["link"] = 4
    g["links"].append([4, 5, 0, 2, 1, "INT"])
    api = ui_to_api(g, host.input_types)
    assert api["2:1"]["inputs"]["width"] == 200 and api["2:1"]["inputs"]["height"] == 112


def test_nested_subgraph_defined_inside_its_parent(host):
    """An instance of Resize inside subgraph Outer, Resize's definition kept in Outer's own definitions."""
    outer = {
        "id": OUTER, "name": "Outer", "version": 1,
        "inputs": [{"id": "a", "name": "samples", "type": "LATENT", "linkIds": [1]}],
        "outputs": [{"id": "b", "name": "LATENT", "type": "LATENT", "linkIds": [2]}],
        "nodes": [_instance(7, RESIZE, inputs=_resize_inputs(1),
                            outputs=[{"name": "LATENT", "type": "LATENT", "links": [2]},
                                     {"name": "same", "type": "LATENT", "links": []}], widgets=[72, 40])],
        "links": [_link(1, -10, 0, 7, 0, "LATENT"), _link(2, 7, 0, -20, 0, "LATENT")],
        "definitions": {"subgraphs": [resize_subgraph()]},
    }
    g = subgraph_workflow()
    g["definitions"]["subgraphs"] = [outer]
    g["nodes"][1] = _instance(2, OUTER, inputs=[{"name": "samples", "type": "LATENT", "link": 1}],
                              outputs=[{"name": "LATENT", "type": "LATENT", "links": [2]}])
    g["nodes"] = g["nodes"][:3]
    g["links"] = g["links"][:2]
    api = ui_to_api(g, host.input_types, known_types=set(host.node_classes))
    assert set(api) == {"1", "2:7:1", "3"}
    assert api["2:7:1"]["inputs"] == {"upscale_method": "nearest-exact", "width": 72, "height": 40,
                                      "crop": "disabled", "samples": ["1", 0]}
    assert api["3"]["inputs"]["samples"] == ["2:7:1", 0]


def test_bypassed_subgraph_instance(host):
    g = subgraph_workflow()
    g["nodes"][1]["mode"] = 4
    g["definitions"]["subgraphs"][0]["nodes"][0]["mode"] = 4   # what the frontend's Bypass command also does
    api = ui_to_api(g, host.input_types)
    assert set(api) == {"1", "3", "4"}
    assert api["3"]["inputs"]["samples"] == ["1", 0] and api["4"]["inputs"]["samples"] == ["1", 0]


def test_missing_subgraph_definition_is_a_clear_error(host):
    from z2i.headless.workflow import MissingSubgraph
    g = subgraph_workflow()
    g["definitions"]["subgraphs"] = []
    with pytest.raises(MissingSubgraph, match=rf"{RESIZE} \(node 2\).*definitions\.subgraphs"):
        ui_to_api(g, host.input_types, known_types=set(host.node_classes))
    del g["definitions"]
    with pytest.raises(MissingSubgraph, match=RESIZE):
        ui_to_api(g, host.input_types)


def test_subgraph_containing_itself_is_refused(host):
    g = subgraph_workflow()
    sg = g["definitions"]["subgraphs"][0]
    sg["nodes"].append(_instance(9, RESIZE, inputs=[], outputs=[]))
    with pytest.raises(WorkflowError, match="contains itself"):
        ui_to_api(g, host.input_types)


def test_subgraph_input_link_in_the_root_graph_is_refused(host):
    g = subgraph_workflow()
    g["links"][0] = [1, -10, 0, 2, 0, "LATENT"]
    with pytest.raises(WorkflowError, match="link 1 comes from a subgraph input"):
        ui_to_api(g, host.input_types)


def test_unconnected_subgraph_output_leaves_the_consumer_unfed(host):
    g = subgraph_workflow()
    g["definitions"]["subgraphs"][0]["outputs"][0]["linkIds"] = []
    with pytest.raises(WorkflowError, match=r"node 3 \(LatentUpscaleBy\): required input 'samples'"):
        ui_to_api(g, host.input_types)
