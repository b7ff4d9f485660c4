"""The headless runner (`python -m z2i.run`): main job, folders of images, clear failures."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WF = REPO / "workflows" / "z2i_ddim_img2img.json"
TQDM_LINE = re.compile(r"\d+/\d+ \[[^\]]*\]")          # tqdm's "k/N [elapsed<left, rate]"


def run(*args, env=None, timeout=600):
    e = {**os.environ, "PYTHONPATH": str(REPO / ".host" / "pythonpath"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "z2i.run", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=timeout)


def test_missing_host_says_how_to_set_it_up(tmp_path):
    r = run(WF, "--comfyui", tmp_path / "nowhere")
    assert r.returncode == 2
    assert "bash tools/setup.sh" in r.stderr and "No ComfyUI host" in r.stderr


@pytest.mark.slow
def test_folder_of_images_runs_then_skips(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), color).save(inp / f"img{i}.png")
    args = [WF, "--checkpoint", "z2i-tiny-sd15.safetensors", "--input-dir", inp, "--output-dir", out,
            "--set", "BasicScheduler.steps=3", "-q"]
    r = run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 run, 0 skipped" in r.stdout
    assert not TQDM_LINE.search(r.stderr) and "SamplerCustom #" not in r.stderr, "-q drew a progress bar"
    assert sorted(p.name.split("_")[0] for p in out.glob("*.png")) == ["img0", "img1", "img2"]
    r2 = run(*args)
    assert r2.returncode == 0 and "0 run, 3 skipped" in r2.stdout
    (inp / "img3.png").write_bytes(b"this is not a png")
    r3 = run(*args)
    assert r3.returncode == 1 and "img3.png" in r3.stderr and "not a readable image" in r3.stderr


def _two_images(folder: Path) -> Path:
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), color).save(folder / f"img{i}.png")
    return folder


@pytest.mark.slow
def test_progress_bars_when_forced(tmp_path):
    """--progress draws the bars although stderr is a pipe here: the sampler node's, named by its class and id, up
    to its step count, and the one over the images; the per-image lines and the summary stay as they were."""
    inp = _two_images(tmp_path / "in")
    r = run(WF, "--checkpoint", "z2i-tiny-sd15.safetensors", "--input-dir", inp, "--output-dir", tmp_path / "out",
            "--set", "BasicScheduler.steps=3", "--progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"SamplerCustom #9: +100%\|[^\r\n]*\| 3/3 \[", r.stderr), r.stderr[-3000:]
    assert re.search(r"SamplerCustom #9: +0%\|[^\r\n]*\| 0/3 \[", r.stderr)
    assert re.search(r"images: +100%\|[^\r\n]*\| 2/2 \[", r.stderr), r.stderr[-3000:]
    lines = r.stderr.replace("\r", "\n").splitlines()
    assert any(re.fullmatch(r"\[1/2\] img0\.png: done \(\d+\.\ds\)", x) for x in lines)
    assert any(re.fullmatch(r"\[2/2\] img1\.png: done \(\d+\.\ds\)", x) for x in lines)
    assert "2 run, 0 skipped, 2 images written" in r.stdout and not TQDM_LINE.search(r.stdout)


@pytest.mark.slow
def test_no_progress_bars_when_not_a_terminal(tmp_path):
    """A run whose stderr is not a terminal (a pipe here) draws no bar without --progress (-q draws none either:
    test_folder_of_images_runs_then_skips)."""
    inp = _two_images(tmp_path / "in")
    r = run(WF, "--checkpoint", "z2i-tiny-sd15.safetensors", "--input-dir", inp, "--set", "BasicScheduler.steps=3",
            "--output-dir", tmp_path / "p")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 run, 0 skipped, 2 images written" in r.stdout
    assert "[2/2] img1.png: done" in r.stderr
    assert not TQDM_LINE.search(r.stderr) and "SamplerCustom #" not in r.stderr, r.stderr[-3000:]


def test_unknown_node_is_reported_not_a_traceback(tmp_path):
    wf = json.loads(WF.read_text())
    wf["nodes"].append({"id": 99, "type": "NotARealNode", "pos": [0, 0], "size": [100, 100], "flags": {},
                        "order": 99, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                        "widgets_values": []})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(wf))
    r = run(bad, "-q")
    assert r.returncode == 2
    assert "NotARealNode (node 99)" in r.stderr and "Traceback" not in r.stderr


def test_set_rejects_unknown_target():
    r = run(WF, "--set", "NoSuchNode.steps=3", "-q")
    assert r.returncode != 0 and "NoSuchNode" in r.stderr


# -- subgraphs (tests/test_subgraphs.py says how the frontend made this file) -----------------------------------
SUBGRAPH_WF = REPO / "tests" / "data" / "subgraph_ddim_img2img.json"


def _env_of_this_host():
    """The subprocess keeps this run's PYTHONPATH too (tools/test-host.sh puts a second host's packages there)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / ".host" / "pythonpath"),
                                                        os.environ.get("PYTHONPATH")]))}


@pytest.mark.host
@pytest.mark.slow
def test_subgraph_workflow_runs(tmp_path):
    """The frontend-saved workflow with two instances of a subgraph, one nested in another, writes both images;
    --set reaches a node inside the nested subgraph by its id in the prompt (<outer>:<instance>:<node>)."""
    api = json.loads(SUBGRAPH_WF.with_suffix(".api.json").read_text())
    nested = max((k for k, n in api.items() if n["class_type"] == "SamplerCustom"), key=lambda k: k.count(":"))
    assert nested.count(":") == 2
    out = tmp_path / "out"
    r = run(SUBGRAPH_WF, "--checkpoint", "z2i-tiny-sd15.safetensors", "--output-dir", out,
            "--set", f"{nested}.cfg=4.0", "-q", env=_env_of_this_host())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 run, 0 skipped, 2 images written" in r.stdout
    assert sorted(p.name.rsplit("_", 2)[0] for p in out.glob("*.png")) == ["z2i_ddim_img2img", "z2i_subgraph_second"]


@pytest.mark.host
def test_subgraph_without_its_definition_is_reported_not_a_traceback(tmp_path):
    wf = json.loads(SUBGRAPH_WF.read_text())
    gone = wf["definitions"]["subgraphs"].pop()
    bad = tmp_path / "cut.json"
    bad.write_text(json.dumps(wf))
    r = run(bad, "-q", env=_env_of_this_host())
    assert r.returncode == 2, r.stderr[-3000:]
    assert gone["id"] in r.stderr and "definitions.subgraphs" in r.stderr and "Traceback" not in r.stderr
