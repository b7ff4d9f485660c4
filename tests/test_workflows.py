"""Every shipped workflow runs: headless in process, and POSTed to the real server over HTTP."""
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from z2i.headless.workflow import ui_to_api
from z2i.tests.test_reliability_files import no_network  # noqa: F401  (fixture: the network blocked)

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
EXAMPLE_IMAGE = REPO / "assets" / "z2i_example.png"  # the image the pack ships and copies into input/
TINY = {"sdxl": "z2i-tiny-sdxl.safetensors", "sd3": "z2i-tiny-sd3.safetensors"}


def tiny_checkpoint_for(path: Path) -> str:
    """The tiny checkpoint of a workflow's family, from its file name (z2i_sdxl_*, z2i_sd3_*; SD1.5 otherwise)."""
    return next((ckpt for family, ckpt in TINY.items() if f"_{family}_" in f"{path.stem}_"), "z2i-tiny-sd15.safetensors")


# The shipped files carry the papers' step and sentence counts; on 2 CPU cores the tests run them shorter (2 steps:
# the workflows are checked to run end to end in each host; the methods' numbers are checked by their own tests).
CAPS = {"steps": 2, "num_sentences": 4, "reg_iterations": 1, "iterations": 2}
# Shipped workflows name real model files; the tests swap in the tiny ones setup builds (open_clip) or
# `tiny_models` makes (BLIP, a saved edit direction of the tiny SD1.5 CLIP), and give saved files test names.
TINY_BLIP = "z2i-tiny-blip"
TINY_DIRECTION = "z2i-tiny-sd15-cat_to_dog.safetensors"
SWAPS = {"Z2I_OpenCLIPLoader": {"name": "z2i-tiny-clip.safetensors", "architecture": "auto (config beside the weights)"},
         "Z2I_BLIPCaption": {"model": TINY_BLIP},
         "Z2I_LoadEditDirection": {"name": TINY_DIRECTION},
         "Z2I_SaveEditDirection": {"filename": "z2i_test_workflow_cat_to_dog"},
         "Z2I_SaveHDirection": {"filename": "z2i_test_workflow_smile"}}


def ensure_tiny_models(host) -> None:
    """The tiny models the swaps name, made once into the host's model folders (only when absent; written under a
    temporary name and renamed, so that a concurrent test run never reads half a file)."""
    from z2i.tests.helpers import make_tiny_blip

    blip = Path(host.folder_paths.get_folder_paths("blip")[0]) / TINY_BLIP
    if not (blip / "config.json").is_file():
        make_tiny_blip(str(blip))
    directions = Path(host.folder_paths.get_folder_paths("edit_directions")[0])
    target = directions / TINY_DIRECTION
    if not target.is_file():
        import safetensors.torch
        res = host.run_prompt({
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "z2i-tiny-sd15.safetensors"}},
            "dir": {"class_type": "Z2I_EditDirection", "inputs": {"clip": ["ckpt", 1], "source": "cat",
                                                                  "target": "dog", "num_sentences": 4, "seed": 0}}},
            targets=["dir"])
        directions.mkdir(parents=True, exist_ok=True)
        tmp = directions / f".{TINY_DIRECTION}.{os.getpid()}.tmp"
        tensors, metadata = res.output("dir", 0).to_safetensors()
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)


@pytest.fixture(scope="session")
def tiny_models(host):
    ensure_tiny_models(host)


def _prepare(prompt: dict, path: Path, caps: dict = CAPS) -> dict:
    """The tiny models swapped in and the counts capped (caps={}: the workflow's own counts)."""
    for n in prompt.values():
        if n["class_type"] == "CheckpointLoaderSimple":
            n["inputs"]["ckpt_name"] = tiny_checkpoint_for(path)
        n["inputs"].update(SWAPS.get(n["class_type"], {}))
        for name, cap in caps.items():
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
    note = notes[0]["widgets_values"][0]
    for what in ("Swap in:", "- Load Image: your picture", "- Load Checkpoint: ", "- Prompts: "):
        assert what in note, f"the Note says what to swap in (missing {what!r})"
    images = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"]
    assert images and set(images) == {EXAMPLE_IMAGE.name}, "every workflow starts from the image the pack ships"


def test_workflows_is_the_only_template_folder():
    """ComfyUI serves a pack's templates from the first of these folders that exists, all under one URL prefix
    (app/custom_node_manager.py, 0.3.75 and 0.8.0): an examples/ folder beside workflows/ would answer every
    /api/workflow_templates/z2i/<file> request with a 404 (the thumbnails and the template files themselves)."""
    names = ["example_workflows", "example", "examples", "workflow", "workflows"]
    assert [n for n in names if (REPO / n).exists()] == ["workflows"]


def test_the_pack_ships_a_small_example_image():
    from PIL import Image
    data = EXAMPLE_IMAGE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 60_000
    with Image.open(EXAMPLE_IMAGE) as img:
        assert img.mode == "RGB" and img.size[0] % 8 == 0 and img.size[1] % 8 == 0
    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_example_image.py"), "--check"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _loaded_module(file: Path):
    """The module the host loaded from `file` (ComfyUI names a pack's modules after their path, not `z2i`). pytest's
    importlib mode may also import the repository's root `__init__.py` as a lone module (no package, so its
    relative imports fail; seen in a clone named other than the pack): only modules imported as part of a package
    count."""
    for name, mod in sorted(sys.modules.items(), key=lambda kv: kv[0].split(".")[0] == "z2i"):
        f = getattr(mod, "__file__", None)
        spec = getattr(mod, "__spec__", None)
        in_package = spec is not None and bool(spec.parent or spec.submodule_search_locations)
        if f and in_package and Path(f).resolve() == file.resolve():
            return mod
    raise AssertionError(f"the host did not load {file}")


@pytest.mark.host
def test_the_pack_installs_its_example_image_into_the_input_folder(host, tmp_path):
    """On load (the extension's get_node_list) the pack copies assets/z2i_example.png into a stock input folder
    (created if missing); a file of that name already there, the user's or an earlier copy, is never touched."""
    pack_nodes = _loaded_module(REPO / "nodes" / "__init__.py")
    pack = _loaded_module(REPO / "__init__.py")
    fp = host.folder_paths
    assert Path(fp.get_input_directory(), EXAMPLE_IMAGE.name).read_bytes() == EXAMPLE_IMAGE.read_bytes(), \
        "the host's input image is not the one the pack ships"
    before = fp.get_input_directory()
    try:
        stock = tmp_path / "stock_input"
        fp.set_input_directory(str(stock))
        nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
        assert nodes and (stock / EXAMPLE_IMAGE.name).read_bytes() == EXAMPLE_IMAGE.read_bytes()
        assert sorted(p.name for p in stock.iterdir()) == [EXAMPLE_IMAGE.name]
        (stock / EXAMPLE_IMAGE.name).write_bytes(b"the user's own file")
        assert pack_nodes.install_example_image() is None
        assert (stock / EXAMPLE_IMAGE.name).read_bytes() == b"the user's own file"
    finally:
        fp.set_input_directory(before)


@pytest.mark.host
def test_workflows_match_their_builder(host):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_workflows.py"), "--check"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.host
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_headless(host, path, no_network, tiny_models):
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
@pytest.mark.once
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_over_http(server, path, tiny_models):
    info = server.get_json("/object_info")
    prompt = _prepare(ui_to_api(json.loads(path.read_text()), lambda t: info[t]["input"], set(info)), path)
    entry = server.run(prompt)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images
    img = images[0]
    data = server.get_bytes(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
