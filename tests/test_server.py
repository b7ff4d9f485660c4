"""The real server: our nodes are registered, a prompt POSTed to /prompt runs, /history reports it."""
import pytest

from z2i.tests.helpers import txt2img_prompt

pytestmark = pytest.mark.server


def test_nodes_registered_with_tooltips(server):
    info = server.get_json("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("Z2I_")}
    assert "Z2I_DDIMSampler" in ours
    for node_id, spec in ours.items():
        assert spec["category"].startswith("Z2I/"), node_id
        assert spec["description"], node_id
        for section in ("required", "optional"):
            for name, inp in (spec["input"].get(section) or {}).items():
                opts = inp[1] if len(inp) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_post_prompt_poll_history_image_exists(server):
    p = txt2img_prompt("z2i-tiny-sd15.safetensors", {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}},
                       steps=3, cfg=2.0)
    entry = server.run(p)
    img = entry["outputs"]["save"]["images"][0]
    assert (server.output_dir / img["subfolder"] / img["filename"]).is_file()
    data = server.get_bytes(f"/view?filename={img['filename']}&type=output")
    assert data[:4] == b"\x89PNG"


def test_bad_prompt_is_rejected_with_node_errors(server):
    p = txt2img_prompt("z2i-tiny-sd15.safetensors", {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 5.0}})
    with pytest.raises(AssertionError, match="eta"):
        server.run(p)
