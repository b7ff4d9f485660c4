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
