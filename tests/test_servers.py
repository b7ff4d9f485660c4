"""The runner's server mode (issue 31; headless/servers.py): jobs files, parameters, stable job ids and names,
the manifest's resume rules, the pack version a server advertises. The runs against real servers are below."""
import json
import tomllib
from pathlib import Path

import pytest

from z2i.headless import servers
from z2i.run import IMAGE_SUFFIXES, apply_sets

REPO = Path(__file__).resolve().parents[1]

PROMPT = {
    "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]},
          "_meta": {"title": "Source prompt (caption)"}},
    "2": {"class_type": "Z2I_EditDirection", "inputs": {"source": "cat", "target": "dog", "seed": 0}},
    "3": {"class_type": "SamplerCustom", "inputs": {"noise_seed": 0, "cfg": 5.0}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
}


def test_version_file_matches_the_package():
    """Preflight compares a server's /extensions/z2i/z2i-version.json (web/, served by ComfyUI) with the runner's
    own version: the file must say pyproject's version."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert json.loads((REPO / "web" / "z2i-version.json").read_text()) == {"version": version}
    assert servers.pack_version() == version


def _images(tmp_path, names):
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(b"\x89PNG fake " + bytes([i]))


def test_jobs_from_csv_and_jsonl(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "jobs.csv").write_text("image,caption,seed,3.cfg\na.png,a red circle,7,4.5\nb.png,,8,\n")
    jobs = servers.read_jobs(tmp_path / "jobs.csv", None, IMAGE_SUFFIXES)
    assert [j.image.name for j in jobs] == ["a.png", "b.png"]
    assert jobs[0].params == {"caption": "a red circle", "seed": 7, "3.cfg": 4.5} and jobs[1].params == {"seed": 8}
    (tmp_path / "jobs.jsonl").write_text('{"image": "a.png", "source": "circle", "target": "square"}\n\n')
    jobs = servers.read_jobs(tmp_path / "jobs.jsonl", None, IMAGE_SUFFIXES)
    assert len(jobs) == 1 and jobs[0].params == {"source": "circle", "target": "square"}
    (tmp_path / "bad.csv").write_text("image\nmissing.png\n")
    with pytest.raises(servers.BatchError, match="missing.png not found"):
        servers.read_jobs(tmp_path / "bad.csv", None, IMAGE_SUFFIXES)


def test_parameters_expand_to_node_inputs():
    p = json.loads(json.dumps(PROMPT))
    job = servers.Job(None, {"caption": "a dog", "source": "circle", "seed": 5, "4.ckpt_name": "y.safetensors"}, 1)
    out = servers.job_prompt(p, job, apply_sets)
    assert out["1"]["inputs"]["text"] == "a dog" and out["2"]["inputs"]["source"] == "circle"
    assert out["2"]["inputs"]["seed"] == 5 and out["3"]["inputs"]["noise_seed"] == 5
    assert out["4"]["inputs"]["ckpt_name"] == "y.safetensors" and p == PROMPT      # the base graph untouched
    with pytest.raises(servers.BatchError, match="NODE.INPUT"):
        servers.job_prompt(p, servers.Job(None, {"cfg": 3}, 1), apply_sets)
    with pytest.raises(SystemExit, match="no node"):
        servers.job_prompt(p, servers.Job(None, {"99.cfg": 3}, 1), apply_sets)


def test_job_ids_are_stable_and_names_unique(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())      # same bytes, another name
    mk = lambda: [servers.Job(tmp_path / "a.png", {}, 1), servers.Job(tmp_path / "b.png", {}, 2),  # noqa: E731
                  servers.Job(tmp_path / "a.png", {"seed": 1}, 3)]
    a, b = mk(), mk()
    servers.identify(a, "wf")
    servers.identify(b, "wf")
    assert [j.id for j in a] == [j.id for j in b] and len({j.id for j in a}) == 3
    assert [j.prefix for j in a][:2] == ["a", "b"] and a[2].prefix.startswith("a_")
    c = mk()
    servers.identify(c, "another workflow")
    assert {j.id for j in c}.isdisjoint({j.id for j in a})
    with pytest.raises(servers.BatchError, match="same outputs"):
        servers.identify([servers.Job(tmp_path / "a.png", {}, 1), servers.Job(tmp_path / "a.png", {}, 2)], "wf")


def test_manifest_resume_rules(tmp_path):
    job = servers.Job(None, {}, 1, id="j1", prefix="x")
    m = servers.Manifest(tmp_path / "manifest.jsonl")
    assert not m.done(job, tmp_path) and m.attempts(job) == 0
    m.append({"job": "j1", "status": "failed", "outputs": []})
    m.append({"job": "j1", "status": "done", "outputs": ["x_00001_.png"]})
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"job": "j2", "sta')                       # a line cut by a crash is ignored
    m2 = servers.Manifest(tmp_path / "manifest.jsonl")
    assert m2.attempts(job) == 1 and not m2.done(job, tmp_path)     # its output is missing: run again
    (tmp_path / "x_00001_.png").write_bytes(b"png")
    assert m2.done(job, tmp_path) and not m2.invalid(job)
    m2.append({"job": "j3", "status": "invalid", "outputs": []})
    assert servers.Manifest(tmp_path / "manifest.jsonl").invalid(servers.Job(None, {}, 1, id="j3"))


def test_auth_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("Z2I_SERVER_TOKEN", raising=False)
    monkeypatch.delenv("Z2I_SERVER_HEADER", raising=False)
    assert servers.auth_headers() == {}
    monkeypatch.setenv("Z2I_SERVER_TOKEN", "s3cret")
    monkeypatch.setenv("Z2I_SERVER_HEADER", "X-Proxy-Key: abc")
    assert servers.auth_headers() == {"Authorization": "Bearer s3cret", "X-Proxy-Key": "abc"}
    monkeypatch.setenv("Z2I_SERVER_HEADER", "no colon")
    with pytest.raises(servers.BatchError):
        servers.auth_headers()
