"""Every shipped workflow runs: headless in process, and POSTed to the real server over HTTP."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from z2i.headless.workflow import ui_to_api
from z2i.tests.test_reliability_files import no_network  # noqa: F401  (fixture: the network blocked)

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
TINY = {"sdxl": "z2i-tiny-sdxl.safetensors"}


def tiny_checkpoint_for(path: Path) -> str:
    return TINY["sdxl"] if "sdxl" in path.stem else "z2i-tiny-sd15.safetensors"


# The shipped files carry the papers' step and sentence counts; on 2 CPU cores the tests run them shorter.
CAPS = {"steps": 4, "num_sentences": 4, "reg_iterations": 1, "iterations": 2}
# Shipped workflows name real model files; the tests swap in the tiny ones setup builds.
SWAPS = {"Z2I_OpenCLIPLoader": {"name": "z2i-tiny-clip.safetensors", "architecture": "auto (config beside the weights)"}}


def _prepare(prompt: dict, path: Path) -> dict:
    for n in prompt.values():
        if n["class_type"] == "CheckpointLoaderSimple":
            n["inputs"]["ckpt_name"] = tiny_checkpoint_for(path)
        n["inputs"].update(SWAPS.get(n["class_type"], {}))
        for name, cap in CAPS.items():
            if isinstance(n["inputs"].get(name), int) and not isinstance(n["inputs"][name], bool):
                n["inputs"][name] = min(n["inputs"][name], cap)
    return prompt


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ is empty"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_ui_format_with_a_note(path):
    wf = json.loads(path.read_text())
    assert "nodes" in wf and "links" in wf, "workflows/ holds UI-format files (the template browser loads these)"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and notes[0]["widgets_values"][0].strip(), "each workflow carries a Note saying what to change"
    ckpts = [n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    assert all(not n["widgets_values"][0].startswith("z2i-tiny") for n in ckpts), "ship standard checkpoint names"


@pytest.mark.host
def test_workflows_match_their_builder(host):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_workflows.py"), "--check"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.host
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_headless(host, path, no_network):
    """... with every way out to the network blocked (socket connect, create_connection, getaddrinfo): no
    attempt is made (nothing is fetched at run time)."""
    prompt = _prepare(ui_to_api(json.loads(path.read_text()), host.input_types, set(host.node_classes)), path)
    res = host.run_prompt(prompt)
    assert not no_network, no_network
    images = [img for out in res.ui.values() for img in out.get("images", [])]
    assert images, "the workflow saved no image"
    for img in images:
        f = Path(host.folder_paths.get_directory_by_type(img["type"])) / img["subfolder"] / img["filename"]
        assert f.is_file() and f.stat().st_size > 0


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_over_http(server, path):
    info = server.get_json("/object_info")
    prompt = _prepare(ui_to_api(json.loads(path.read_text()), lambda t: info[t]["input"], set(info)), path)
    entry = server.run(prompt)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images
    img = images[0]
    data = server.get_bytes(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
