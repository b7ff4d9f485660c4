"""Issue 18, files: every file name resolved inside its model folder, no network at run time, save names the file
system can take, loaded direction files checked (format, shapes, NaN, implicit configs) before anything is built,
and errors that reach the UI as `Z2IInputError: <node>: input '<input>': <problem>. <fix>`.

Server tests post to the real /prompt and read back what the UI gets (the /prompt rejection for widget values,
the execution_error of /history for run-time errors); host tests run the same nodes in-process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
import torch

from z2i.tests.helpers import make_tiny_blip

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[1]
PREFIX = "z2i_test_rel_"
BLIP_NODE, CLIP_NODE = "Z2I BLIP Caption", "Z2I Load open_clip (for CLIP losses)"
LOAD_E, SAVE_E = "Z2I Load Edit Direction", "Z2I Save Edit Direction"
LOAD_H, SAVE_H = "Z2I Load h-space Direction", "Z2I Save h-space Direction"
AUTO = "auto (config beside the weights)"
HOSTILE_ARCHS = ["hf-hub:gpt2", "local-dir:/tmp", "../../x", "/etc/passwd", "hf-hub:timm/ViT-B-16-SigLIP"]
HOSTILE_NAMES = ["../../x", "/etc/passwd", "hf-hub:gpt2", "local-dir:/tmp", "../../../somewhere",
                 "Salesforce/blip-image-captioning-base", "a\x00b"]


# -- fixtures -------------------------------------------------------------------------------------------------
def folder(host, name: str) -> Path:
    path = Path(host.folder_paths.get_folder_paths(name)[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def written(host):
    """Files this module writes into model folders, removed at the end."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


@pytest.fixture(scope="module")
def tiny_clip(host):
    """The tiny random open_clip setup puts in models/open_clip (built here when missing, as setup does)."""
    spec = importlib.util.spec_from_file_location("z2i_make_tiny_open_clip", REPO / "tools" / "make_tiny_open_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build(folder(host, "open_clip")).name


@pytest.fixture(scope="module")
def tiny_blip(host):
    path = folder(host, "blip") / "z2i-tiny-blip"
    if not (path / "config.json").is_file():
        make_tiny_blip(str(path))
    return "z2i-tiny-blip"


def write(host, written, kind: str, name: str, tensors: dict, metadata: dict | None) -> str:
    path = folder(host, kind) / name
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    written.append(path)
    return name


def edit_direction_file(host, written, name: str, delta: torch.Tensor, **meta_over) -> str:
    from z2i.guidance.edit_direction import EditDirection
    tensors, metadata = EditDirection(delta=delta, meta={"encoder": "test"}).to_safetensors()
    metadata.update(meta_over)
    return write(host, written, "edit_directions", name, tensors, metadata)


def h_direction_file(host, written, name: str, tensors: dict, implicit: list | None = None, fmt="z2i.h_direction.v1"):
    metadata = {"format": fmt, "meta": json.dumps({"mode": "test"}), "implicit": json.dumps(implicit or [])}
    return write(host, written, "h_directions", name, tensors, metadata)


def implicit_tensors(channels: int, hidden: int, temb: int = 128, i: int = 0) -> dict:
    shapes = {"conv1.weight": (hidden, channels, 1, 1), "conv1.bias": (hidden,), "temb.weight": (hidden, temb),
              "temb.bias": (hidden,), "norm.weight": (hidden,), "norm.bias": (hidden,),
              "conv2.weight": (channels, hidden, 1, 1), "conv2.bias": (channels,)}
    return {f"implicit.{i}.{k}": torch.randn(s) * 0.01 for k, s in shapes.items()}


def raw_file(host, written, kind: str, name: str, data: bytes) -> str:
    path = folder(host, kind) / name
    path.write_bytes(data)
    written.append(path)
    return name


def assert_message(text: str, node: str, input_name: str, problem: str, fix: str) -> None:
    assert f"{node}: input '{input_name}'" in text, text
    assert problem in text, text
    assert fix in text, text


def run_error(host, prompt: dict, targets: list[str]) -> str:
    from z2i.headless.host import PromptFailed
    with pytest.raises(PromptFailed) as e:
        host.run_prompt(prompt, targets=targets)
    return str(e.value)


def load_graph(cls: str, name: str, save_cls: str, filename: str = "z2i_test_rel_out") -> dict:
    return {"load": {"class_type": cls, "inputs": {"name": name}},
            "save": {"class_type": save_cls, "inputs": {"direction": ["load", 0], "filename": filename}}}


# -- the real server: what the UI shows -------------------------------------------------------------------------
def post_prompt(server, prompt: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": prompt, "client_id": "z2i-rel"})
                                 .encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rejection_text(server, prompt: dict) -> str:
    """The node errors /prompt answers for a prompt that does not validate (what the UI marks red)."""
    code, body = post_prompt(server, prompt)
    assert code == 400, body
    return " | ".join(f"{e['message']}: {e['details']}" for info in body["node_errors"].values()
                      for e in info["errors"])


def execution_error(server, prompt: dict, timeout: float = 120.0) -> dict:
    """The execution_error the UI shows for a prompt that validates but fails while it runs."""
    code, body = post_prompt(server, prompt)
    assert code == 200, body
    pid, deadline = body["prompt_id"], time.time() + timeout
    while time.time() < deadline:
        hist = server.get_json(f"/history/{pid}")
        if pid in hist:
            status = hist[pid]["status"]
            assert status["status_str"] == "error", status
            return next(d for e, d in status["messages"] if e == "execution_error")
        time.sleep(0.3)
    raise TimeoutError(server.log_tail())


# -- 1. files outside their folder, the network at run time --------------------------------------------------
@pytest.mark.server
def test_server_blip_path_outside_models_blip_is_refused(server, host, tiny_blip):
    for name, problem in (("../../../somewhere", "leads out of models/blip"),
                          ("/tmp/" + tiny_blip, "is an absolute path")):
        text = rejection_text(server, {
            "img": {"class_type": "LoadImage", "inputs": {"image": "z2i_example.png"}},
            "cap": {"class_type": "Z2I_BLIPCaption", "inputs": {"image": ["img", 0], "model": name, "num_beams": 1,
                                                                "max_new_tokens": 4}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["cap", 0]}}})
        assert_message(text, BLIP_NODE, "model", problem, "one folder per model")


def test_blip_model_outside_the_folder_is_refused_at_run_time(host, tiny_blip, tmp_path):
    """A real BLIP folder outside models/blip (absolute path, or reached with '..') is never loaded, even when the
    node is called without ComfyUI's validation."""
    outside = tmp_path / "blip_outside"
    shutil.copytree(folder(host, "blip") / tiny_blip, outside)
    node = host.node_classes["Z2I_BLIPCaption"]
    rel = os.path.relpath(outside, folder(host, "blip"))
    for name, problem in ((str(outside), "is an absolute path"), (rel, "leads out of models/blip")):
        assert node.validate_inputs(model=name) != True  # noqa: E712  (True or the message)
        with pytest.raises(ValueError) as e:
            node.execute(image=torch.zeros(1, 32, 32, 3), model=name, num_beams=1, max_new_tokens=4)
        assert type(e.value).__name__ == "Z2IInputError"
        assert_message(str(e.value), BLIP_NODE, "model", problem, "one folder per model")
    ok = node.execute(image=torch.zeros(1, 32, 32, 3), model=tiny_blip, num_beams=1, max_new_tokens=4)
    assert isinstance(ok.result[0][0], str)                 # the listed model still captions


@pytest.mark.server
def test_server_open_clip_hub_and_local_dir_architectures_are_refused(server, host, tiny_clip):
    for arch in ("local-dir:/tmp", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        text = rejection_text(server, {"oc": {"class_type": "Z2I_OpenCLIPLoader",
                                              "inputs": {"name": tiny_clip, "architecture": arch}},
                                       "agg": _style_consumer()})
        assert_message(text, CLIP_NODE, "architecture", "names a hub or folder location", "nothing is downloaded")
    text = rejection_text(server, {"oc": {"class_type": "Z2I_OpenCLIPLoader", "inputs": {
        "name": "../checkpoints/z2i-tiny-sd15.safetensors", "architecture": "ViT-B-32"}}, "agg": _style_consumer()})
    assert_message(text, CLIP_NODE, "name", "leads out of models/open_clip", "pick them in the list")


def _style_consumer() -> dict:
    """An output node fed by the open_clip loader's output (so the loader is part of the prompt)."""
    return {"class_type": "PreviewAny", "inputs": {"source": ["oc", 0]}}


def test_open_clip_file_name_is_never_a_model_name(host, written, tiny_clip):
    """Weights named `hf-hub:gpt2.safetensors` load from disk with their sidecar config (never from a hub); without
    a sidecar they are refused with the fix; a built-in architecture still loads the tiny weights' own config."""
    base = folder(host, "open_clip")
    weights = base / "hf-hub:gpt2.safetensors"
    shutil.copyfile(base / tiny_clip, weights)
    written.append(weights)
    node = host.node_classes["Z2I_OpenCLIPLoader"]
    err = run_error(host, {"oc": {"class_type": "Z2I_OpenCLIPLoader",
                                  "inputs": {"name": weights.name, "architecture": AUTO}}}, ["oc"])
    assert_message(err, CLIP_NODE, "architecture", "no config found for 'hf-hub:gpt2.safetensors'",
                   "pick the model's architecture in the list")
    sidecar = base / "hf-hub:gpt2.json"
    shutil.copyfile(base / tiny_clip.replace(".safetensors", ".json"), sidecar)
    written.append(sidecar)
    enc = node.execute(name=weights.name, architecture=AUTO).result[0]
    ref = safetensors.torch.load_file(str(weights))
    sd = enc.model.state_dict()
    assert all(torch.equal(sd[k].cpu(), v) for k, v in ref.items())
    import open_clip
    assert not any(":" in a and a.startswith(("hf-hub", "local-dir")) for a in open_clip.list_models())
    options = host.input_types("Z2I_OpenCLIPLoader")["required"]["architecture"][1]["options"]
    assert "ViT-B-32" in options and all(":" not in a and not a.startswith("z2i-local-") for a in options)


def test_open_clip_config_folder_layout_loads_the_listed_file(host, written, tiny_clip):
    """open_clip_config.json beside the weights (the HF layout) loads the file picked, from inside models/open_clip."""
    base = folder(host, "open_clip")
    sub = base / f"{PREFIX}hf_layout"
    sub.mkdir(exist_ok=True)
    written.append(sub)
    shutil.copyfile(base / tiny_clip, sub / "open_clip_model.safetensors")
    cfg = json.loads((base / tiny_clip.replace(".safetensors", ".json")).read_text())
    (sub / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3}}))
    name = f"{PREFIX}hf_layout/open_clip_model.safetensors"
    enc = host.run_prompt({"oc": {"class_type": "Z2I_OpenCLIPLoader", "inputs": {"name": name, "architecture": AUTO}}},
                          targets=["oc"]).output("oc", 0)
    assert enc.image_size == 32 and list(enc.mean) == [0.5] * 3
    (sub / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"bogus": 1}}))
    err = run_error(host, {"oc": {"class_type": "Z2I_OpenCLIPLoader", "inputs": {"name": name, "architecture": AUTO}}},
                    ["oc"])
    assert_message(err, CLIP_NODE, "name", "is not an open_clip model config", "fix that config")


@pytest.fixture
def no_network(monkeypatch):
    """Every way out to the network raises and is recorded."""
    attempts: list = []

    def refuse(what):
        def fn(*args, **kwargs):
            attempts.append((what, args[1:2] if what.startswith("socket.") else args[:1]))
            raise OSError(f"network blocked by the test ({what})")
        return fn

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def test_loaders_never_reach_the_network_with_hostile_strings(host, written, tiny_clip, tiny_blip, no_network):
    """open_clip and BLIP loaders with every socket call patched to raise: hostile architecture and model strings are
    refused by validation and again at run time (the node called directly), and no connection is ever tried."""
    base = folder(host, "open_clip")
    hub_named = base / "hf-hub:gpt2.safetensors"
    if not hub_named.exists():
        shutil.copyfile(base / tiny_clip, hub_named)
        written.append(hub_named)
    clip_node, blip_node = host.node_classes["Z2I_OpenCLIPLoader"], host.node_classes["Z2I_BLIPCaption"]
    for arch in HOSTILE_ARCHS:
        for name in (tiny_clip, hub_named.name):
            msg = clip_node.validate_inputs(name=name, architecture=arch)
            assert isinstance(msg, str), (name, arch)
            assert_message(msg, CLIP_NODE, "architecture", "", "nothing is downloaded")
            with pytest.raises(ValueError) as e:
                clip_node.execute(name=name, architecture=arch)
            assert_message(str(e.value), CLIP_NODE, "architecture", repr(arch[:80])[1:-1], "nothing is downloaded")
        err = run_error(host, {"oc": {"class_type": "Z2I_OpenCLIPLoader",
                                      "inputs": {"name": tiny_clip, "architecture": arch}}}, ["oc"])
        assert "Custom validation failed" in err and f"{CLIP_NODE}: input 'architecture'" in err
    for name in HOSTILE_NAMES:
        with pytest.raises(ValueError) as e:
            clip_node.execute(name=name, architecture="ViT-B-32")
        assert_message(str(e.value), CLIP_NODE, "name", "", "pick them in the list")
        with pytest.raises(ValueError) as e:
            blip_node.execute(image=torch.zeros(1, 32, 32, 3), model=name, num_beams=1, max_new_tokens=4)
        assert_message(str(e.value), BLIP_NODE, "model", "", "one folder per model")
        assert blip_node.validate_inputs(model=name) != True  # noqa: E712
    # what should work still works offline
    assert clip_node.execute(name=tiny_clip, architecture=AUTO).result[0].image_size == 32
    assert isinstance(blip_node.execute(image=torch.zeros(1, 32, 32, 3), model=tiny_blip, num_beams=1,
                                        max_new_tokens=4).result[0][0], str)
    assert no_network == [], no_network


# -- 2. save names ----------------------------------------------------------------------------------------------
@pytest.mark.server
def test_server_save_name_with_nul_or_too_long_is_refused(server, host, written):
    name = edit_direction_file(host, written, f"{PREFIX}ok_e.safetensors", torch.randn(1, 77, 768))
    for filename, problem in (("cat\x00dog", "NUL byte"), ("x" * 300, "300 characters long, more than 255")):
        text = rejection_text(server, load_graph("Z2I_LoadEditDirection", name, "Z2I_SaveEditDirection", filename))
        assert_message(text, SAVE_E, "filename", problem, "")
        assert "type the name again" in text or "use a shorter name" in text


def test_save_names_neutralised_or_refused(host, written):
    """'../', absolute paths and backslashes still save inside the folder; NUL and names the file system cannot take
    (over 255 characters, or a file name over 255 bytes with the counter) are clear errors, not OS errors."""
    h = h_direction_file(host, written, f"{PREFIX}ok_h.safetensors", {"delta": torch.randn(1, 8, 2, 2)})
    out = folder(host, "h_directions")
    for filename in ("../../" + PREFIX + "up", "/tmp/" + PREFIX + "abs", "..\\..\\" + PREFIX + "bs"):
        res = host.run_prompt(load_graph("Z2I_LoadHDirection", h, "Z2I_SaveHDirection", filename))
        saved = res.ui["save"]["text"][0]
        assert (out / saved).is_file() and "/" not in saved, saved
        written.append(out / saved)
    for filename, problem, fix in (("a\x00b", "NUL byte", "type the name again"),
                                   ("y" * 256, "256 characters long", "use a shorter name"),
                                   ("é" * 120, "would be 258 bytes", "use a shorter name")):
        err = run_error(host, load_graph("Z2I_LoadHDirection", h, "Z2I_SaveHDirection", filename), ["save"])
        assert_message(err, SAVE_H, "filename", problem, fix)
        with pytest.raises(ValueError) as e:      # the run-time check too (the node called without validation)
            host.node_classes["Z2I_SaveHDirection"].execute(direction=None, filename=filename)
        assert_message(str(e.value), SAVE_H, "filename", problem, fix)
    assert not list(out.glob("y" * 20 + "*")) and not list(out.glob("a*b_*"))


# -- 3. loaded files -------------------------------------------------------------------------------------------
@pytest.mark.server
def test_server_truncated_direction_file_is_a_clean_z2i_error(server, host, written):
    """Truncated safetensors -> the UI shows `Z2IInputError: Z2I Load Edit Direction: input 'name': ...` (no module
    path: issue 18's 'Smaller' item)."""
    good = folder(host, "edit_directions") / edit_direction_file(host, written, f"{PREFIX}full.safetensors",
                                                                 torch.randn(1, 77, 768))
    name = raw_file(host, written, "edit_directions", f"{PREFIX}truncated.safetensors", good.read_bytes()[:1000])
    err = execution_error(server, load_graph("Z2I_LoadEditDirection", name, "Z2I_SaveEditDirection"))
    assert err["exception_type"] == "Z2IInputError", err["exception_type"]
    assert_message(err["exception_message"], LOAD_E, "name", "not a readable safetensors file, corrupt or truncated",
                   "pick a file written by Save Edit Direction")


@pytest.mark.server
def test_server_h_direction_with_huge_layers_is_refused_before_allocating(server, host, written):
    """The 5 PB file of issue 18: an implicit config declaring huge layers is refused from the header."""
    name = h_direction_file(host, written, f"{PREFIX}huge.safetensors", implicit_tensors(4, 8),
                            implicit=[{"coef": 1.0, "config": {"channels": 10_000_000, "hidden": 50_000_000}}])
    err = execution_error(server, load_graph("Z2I_LoadHDirection", name, "Z2I_SaveHDirection"))
    assert err["exception_type"] == "Z2IInputError"
    assert_message(err["exception_message"], LOAD_H, "name",
                   "declares channels = 10000000, expected an integer 1..4096",
                   "pick a file written by Save h-space Direction")
    assert "allocate" not in err["exception_message"]


@pytest.mark.server
def test_server_nan_in_h_direction_is_refused(server, host, written):
    delta = torch.randn(1, 8, 2, 2)
    delta[0, 3, 1, 1] = float("nan")
    name = h_direction_file(host, written, f"{PREFIX}nan_h.safetensors", {"delta": delta})
    err = execution_error(server, load_graph("Z2I_LoadHDirection", name, "Z2I_SaveHDirection"))
    assert_message(err["exception_message"], LOAD_H, "name", "its delta tensor holds 1 NaN or infinite value(s)",
                   "pick a file written by Save h-space Direction")


def test_huge_layers_refused_without_building_anything(host, written, monkeypatch):
    """Within-file tensors that do not match the declared sizes, or sizes over the bounds: no DeltaBlock is built
    (the pack's own module, as ComfyUI loaded it, is patched to record constructions)."""
    built = []
    for mod in [m for k, m in list(sys.modules.items()) if k.endswith("guidance.asyrp_train") and m is not None]:
        orig = mod.DeltaBlock.__init__

        def record(self, *a, _orig=orig, **k):
            if torch.empty(0).device.type != "meta":      # a real build, not the header check's shape probe
                built.append((a, k))
            _orig(self, *a, **k)
        monkeypatch.setattr(mod.DeltaBlock, "__init__", record)
    cases = [({"channels": 4, "hidden": 8, "temb_dim": 10 ** 9}, "declares temb_dim = 1000000000"),
             ({"channels": 4, "hidden": 4096}, "weights do not match its config")]
    for i, (config, problem) in enumerate(cases):
        name = h_direction_file(host, written, f"{PREFIX}big{i}.safetensors", implicit_tensors(4, 8),
                                implicit=[{"coef": 1.0, "config": config}])
        err = run_error(host, {"l": {"class_type": "Z2I_LoadHDirection", "inputs": {"name": name}}}, ["l"])
        assert_message(err, LOAD_H, "name", problem, "pick a file written by Save h-space Direction")
    assert built == [], built


def test_h_direction_malformed_implicit_function(host, written):
    """Unknown config keys ('bogus'), a wrong state_dict and a bad coefficient: clear refusals; the same file with a
    correct config loads and its f_t runs."""
    good = [{"coef": 1.0, "config": {"channels": 4, "hidden": 8, "temb_dim": 128}}]
    cases = [
        ([{"coef": 1.0, "config": {"channels": 4, "hidden": 8, "bogus": 3}}], implicit_tensors(4, 8),
         "config has the keys ['bogus', 'channels', 'hidden'] (unknown: 'bogus')"),
        (good, {k: v for k, v in implicit_tensors(4, 8).items() if "conv2" not in k},
         "missing ['implicit.0.conv2.bias', 'implicit.0.conv2.weight']"),
        (good, {**implicit_tensors(4, 8), "implicit.0.extra": torch.zeros(2)}, "unexpected ['implicit.0.extra']"),
        (good, implicit_tensors(4, 16), "wrong shape"),
        ([{"coef": "x", "config": good[0]["config"]}], implicit_tensors(4, 8), "has coefficient 'x'"),
        ([{"coef": 1.0, "config": good[0]["config"], "more": 1}], implicit_tensors(4, 8), "has the entries"),
        (good, {**implicit_tensors(4, 8), "delta": torch.randn(1, 6, 2, 2)}, "different channel counts [4, 6]"),
    ]
    for i, (implicit, tensors, problem) in enumerate(cases):
        name = h_direction_file(host, written, f"{PREFIX}impl{i}.safetensors", tensors, implicit=implicit)
        err = run_error(host, {"l": {"class_type": "Z2I_LoadHDirection", "inputs": {"name": name}}}, ["l"])
        assert_message(err, LOAD_H, "name", problem, "pick a file written by Save h-space Direction")
        assert "Z2IInputError: " in err.splitlines()[0] and "_host" not in err.splitlines()[0]
    name = h_direction_file(host, written, f"{PREFIX}impl_ok.safetensors", implicit_tensors(4, 8), implicit=good)
    d = host.run_prompt({"l": {"class_type": "Z2I_LoadHDirection", "inputs": {"name": name}}},
                        targets=["l"]).output("l")
    out = d.delta_for(torch.randn(2, 4, 2, 2), torch.tensor([10.0, 500.0]))
    assert out.shape == (2, 4, 2, 2) and torch.isfinite(out).all()


def test_edit_direction_bad_files(host, written):
    """Garbage bytes, a 1-D delta, a wrongly shaped delta, NaN/Inf, another format: each a clear refusal."""
    from z2i.guidance.edit_direction import FORMAT
    cases = [
        (raw_file(host, written, "edit_directions", f"{PREFIX}garbage.safetensors", b"\xff" * 64 + b"not safetensors"),
         "not a readable safetensors file"),
        (write(host, written, "edit_directions", f"{PREFIX}1d.safetensors", {"delta": torch.randn(768)},
               {"format": FORMAT}), "its delta has shape [768], expected [1, 77, width]"),
        (write(host, written, "edit_directions", f"{PREFIX}shape.safetensors", {"delta": torch.randn(2, 50, 768)},
               {"format": FORMAT}), "its delta has shape [2, 50, 768]"),
        (edit_direction_file(host, written, f"{PREFIX}inf.safetensors",
                             torch.full((1, 77, 768), float("inf"))),
         "its delta tensor holds 59136 NaN or infinite value(s)"),
        (write(host, written, "edit_directions", f"{PREFIX}fmt.safetensors", {"delta": torch.randn(1, 77, 768)},
               {"format": "something.else"}), "not a Z2I edit direction"),
        (edit_direction_file(host, written, f"{PREFIX}meta.safetensors", torch.randn(1, 77, 768), meta="{oops"),
         "its 'meta' entry is not valid JSON"),
        (write(host, written, "edit_directions", f"{PREFIX}pool.safetensors",
               {"delta": torch.randn(1, 77, 768), "pooled": torch.randn(1280)}, {"format": FORMAT}),
         "its pooled vector has shape [1280]"),
    ]
    for name, problem in cases:
        err = run_error(host, {"l": {"class_type": "Z2I_LoadEditDirection", "inputs": {"name": name}}}, ["l"])
        assert_message(err, LOAD_E, "name", f"'{name}': {problem}", "pick a file written by Save Edit Direction")
    err = run_error(host, {"l": {"class_type": "Z2I_LoadEditDirection", "inputs": {"name": "../x.safetensors"}}},
                    ["l"])
    assert "Custom validation failed" in err
    assert_message(err, LOAD_E, "name", "leads out of models/edit_directions", "pick a file written by")


# -- 4. the error's type name in the UI ---------------------------------------------------------------------------
def test_error_type_reads_as_a_short_name(host):
    """ComfyUI writes `exception_type` as module + class unless the module is builtins (execution.full_type_name)."""
    import execution
    cls = type(_raised(host))
    assert execution.full_type_name(cls) == "Z2IInputError" and issubclass(cls, ValueError)
    e = cls("Node", "input", "problem", "fix")
    assert str(e) == "Node: input 'input': problem. fix" and (e.node, e.input_name, e.fix) == ("Node", "input", "fix")
    import pickle
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e)


def _raised(host):
    try:
        host.node_classes["Z2I_LoadEditDirection"].execute(name="../nope")
    except ValueError as e:
        return e
    raise AssertionError("no error")


@pytest.mark.server
def test_server_missing_file_in_a_combo_gets_the_z2i_message(server, host, tiny_clip, tiny_blip):
    """A file picked in a Combo that is not (or no longer) in its model folder: newer ComfyUI (0.8.0) checks Combo
    values against the list before the node runs, so each loader checks its file in validate_inputs, which core
    calls instead of its own list check. The user sees the same Z2I message on every host."""
    cases = [
        (load_graph("Z2I_LoadEditDirection", "gone.safetensors", "Z2I_SaveEditDirection"), LOAD_E, "name",
         "'gone.safetensors' is not in models/edit_directions", "Save Edit Direction"),
        (load_graph("Z2I_LoadHDirection", "gone.safetensors", "Z2I_SaveHDirection"), LOAD_H, "name",
         "'gone.safetensors' is not in models/h_directions", "Save"),
        ({"oc": {"class_type": "Z2I_OpenCLIPLoader", "inputs": {"name": "gone.safetensors", "architecture": AUTO}},
          "agg": _style_consumer()}, CLIP_NODE, "name", "'gone.safetensors' is not in models/open_clip",
         "pick them in the list"),
        ({"img": {"class_type": "LoadImage", "inputs": {"image": "z2i_example.png"}},
          "cap": {"class_type": "Z2I_BLIPCaption", "inputs": {"image": ["img", 0], "model": "gone-blip",
                                                              "num_beams": 1, "max_new_tokens": 4}},
          "show": {"class_type": "PreviewAny", "inputs": {"source": ["cap", 0]}}}, BLIP_NODE, "model",
         "no BLIP model 'gone-blip'", "one folder per model"),
    ]
    for prompt, node, input_name, problem, fix in cases:
        text = rejection_text(server, prompt)
        assert_message(text, node, input_name, problem, fix)
        assert "Value not in list" not in text, text          # core's generic message did not pre-empt ours
