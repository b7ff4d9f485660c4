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


# -- against real ComfyUI servers (0.3.75 with this pack and the tiny SD1.5) ---------------------------------------
WORKFLOW = REPO / "workflows" / "z2i_ddim_img2img.json"
STEPS = 6           # a server holds each job for a second or more (it must be killed while it does)
SLOW_STEPS = 12     # the jobs a Ctrl-C must find running (twice as long: seconds after the first is done)


def _sources(folder: Path, n: int) -> list[Path]:
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    from toy_world.world import render, scenes
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(scenes(n, 31)):
        p = folder / f"img{i}.png"
        render(s).save(p)
        out.append(p)
    return out


def _client(args: list[str], **kw):
    import os
    import subprocess
    import sys
    import signal
    env = {**os.environ, "PYTHONPATH": str(REPO / ".host" / "pythonpath")}
    # the client must see Ctrl-C as a user's terminal sends it: a suite started in the background of a
    # non-interactive shell (`nohup bash .ci/run &`) inherits SIGINT ignored, and a child would ignore it too
    return subprocess.Popen([sys.executable, "-m", "z2i.run", str(WORKFLOW), "--checkpoint",
                             "z2i-tiny-sd15.safetensors", "--no-progress", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _manifest(folder: Path) -> list[dict]:
    path = folder / "manifest.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _in_process(host, image: Path, params: dict):
    """The same job through the in-process runner's path (Host.run_prompt of the same graph and parameters)."""
    import numpy as np
    from PIL import Image

    from z2i.headless.workflow import ui_to_api
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), host.input_types, known_types=set(host.node_classes))
    for n in prompt.values():
        if n["class_type"] == "CheckpointLoaderSimple":
            n["inputs"]["ckpt_name"] = "z2i-tiny-sd15.safetensors"
        if n["class_type"] == "LoadImage":
            dest = Path(host.folder_paths.get_input_directory()) / "z2i_batch_test"
            dest.mkdir(parents=True, exist_ok=True)
            (dest / image.name).write_bytes(image.read_bytes())
            n["inputs"]["image"] = f"z2i_batch_test/{image.name}"
    apply_sets(prompt, [("BasicScheduler", "steps", STEPS)])
    apply_sets(prompt, servers.expand_params(prompt, params))
    res = host.run_prompt(prompt)
    img = next(v for v in res.ui.values() if v.get("images"))["images"][0]
    path = Path(host.folder_paths.get_output_directory()) / img.get("subfolder", "") / img["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    """Two real servers for this module's tests (started once: the kill test, last in the file, ends one)."""
    from z2i.headless.host import find_host
    from z2i.tests.helpers import ComfyServer
    started = []
    root = tmp_path_factory.mktemp("servers")
    try:
        for k in range(2):
            s = ComfyServer(find_host(), root / f"server{k}")
            s.start()
            started.append(s)
        yield started
    finally:
        for s in started:               # by process id, also the one the kill test ended
            s.stop()


@pytest.mark.server
@pytest.mark.slow
def test_batch_preflight_validation_and_resume(two_servers, tmp_path):
    """Preflight names the server and the missing checkpoint before anything runs; a job the server refuses at
    validation is recorded once (a rerun does not send it again); a run stopped with Ctrl-C leaves a manifest of
    finished jobs only, no prompt of it on the servers, and a rerun finishes the rest."""
    import signal
    import time
    a, b = two_servers
    images = _sources(tmp_path / "in", 4)
    out = tmp_path / "out"
    base = ["--input-dir", str(tmp_path / "in"), "--output-dir", str(out), "--set", f"BasicScheduler.steps={STEPS}"]

    rc, log = _finish(_client(["--server", a.url, *base, "--set",
                               "CheckpointLoaderSimple.ckpt_name=nope.safetensors"]))
    assert rc == 2 and a.url in log and "nope.safetensors" in log and "ckpt_name" in log, log
    assert not _manifest(out) and not list(out.glob("*.png"))

    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,BasicScheduler.denoise\n{images[0].name},5.0\n")
    for _ in range(2):
        rc, log = _client(["--server", a.url, "--jobs", str(bad), *base]), None
        rc, log = _finish(rc)
        assert rc == 1, log
    entries = _manifest(out)
    assert [e["status"] for e in entries] == ["invalid"] and "denoise" in entries[0]["error"], entries
    (out / "manifest.jsonl").unlink()

    # the Ctrl-C must land while jobs run: the first job is short, the other three long (SLOW_STEPS), so the
    # first manifest line comes seconds before any other
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,BasicScheduler.steps\n" + "".join(
        f"{p.name},{STEPS if i == 0 else SLOW_STEPS}\n" for i, p in enumerate(images)))
    base += ["--jobs", str(jobs)]
    proc = _client(["--server", a.url, "--server", b.url, "--depth", "1", *base])
    deadline = time.time() + 300
    while time.time() < deadline and not _manifest(out):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rc, log = _finish(proc)
    assert rc == 130, log
    first = _manifest(out)
    assert 0 < len(first) < 4, first
    assert all(e["status"] == "done" and all((out / o).exists() for o in e["outputs"]) for e in first)
    for s in (a, b):
        q = s.get_json("/queue")
        assert not q["queue_pending"], q
    rc, log = _finish(_client(["--server", a.url, "--server", b.url, *base]))
    assert rc == 0, log
    entries = _manifest(out)
    assert sorted(e["status"] for e in entries) == ["done"] * 4 and len({e["job"] for e in entries}) == 4
    assert len(list(out.glob("*.png"))) == 4


@pytest.mark.server
@pytest.mark.slow
def test_batch_across_two_servers_survives_a_killed_server(two_servers, tmp_path, host):
    """6 images with per-image prompts and seeds across two servers; one server is SIGKILLed while it runs a job:
    every output is present exactly once, equal to the in-process run of the same job (PNG bytes decoded: measured
    bit-equal, both at 2 threads), the manifest has one 'done' line per job, and a rerun does nothing."""
    import numpy as np
    import time
    a, b = two_servers
    images = _sources(tmp_path / "in", 6)
    rows = [{"image": p.name, "Positive prompt.text": f"a picture number {i}", "seed": 100 + i}
            for i, p in enumerate(images)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["--server", a.url, "--server", b.url, "--jobs", str(jobs), "--input-dir", str(tmp_path / "in"),
            "--output-dir", str(out), "--set", f"BasicScheduler.steps={STEPS}", "--job-timeout", "300"]
    proc = _client(args)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if b.get_json("/queue")["queue_running"]:
            b.proc.kill()                       # SIGKILL while it holds a job
            killed = True
            break
        time.sleep(0.2)
    assert killed, "server B never ran a job"
    rc, log = _finish(proc)
    assert rc == 0, log
    entries = _manifest(out)
    assert sorted(e["status"] for e in entries) == ["done"] * 6, log
    assert len({e["job"] for e in entries}) == 6
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6 and sorted(o for e in entries for o in e["outputs"]) == pngs
    assert "re-queueing" in log
    for row, image in zip(rows, images):
        e = next(x for x in entries if x["image"].endswith(image.name))
        got = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / e["outputs"][0]).convert("RGB"),
                         dtype=np.int16)
        want = _in_process(host, image, {k: v for k, v in row.items() if k != "image"})
        assert np.array_equal(got, want), (image.name, int(np.abs(got - want).max()))
    rc, log = _finish(_client(args))
    assert rc == 0 and "0 run" in log and len(_manifest(out)) == 6, log


# -- faults, against fake servers that speak ComfyUI's API (no ComfyUI: what a hung or restarted server does is
# hard to make a real one do on cue) ---------------------------------------------------------------------------------
FAULT_PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}


def _fake_server(mode: str, log: list):
    """An aiohttp app answering the endpoints the server mode uses. mode 'ok' finishes each prompt at once (a
    websocket event, /history with one output image, /view its bytes); 'hang' keeps every prompt running forever;
    'restart' forgets every prompt as soon as it is queued (what a restarted ComfyUI's /queue and /history show).
    log gets (mode, method, path, body) for the requests that change state."""
    from aiohttp import web
    history, running, sockets = {}, [], {}

    async def system_stats(_):
        return web.json_response({"system": {}})

    async def object_info(_):
        return web.json_response({"LoadImage": {"input": {"required": {"image": [["x.png"], {}]}}},
                                  "SaveImage": {"input": {"required": {"images": ["IMAGE"],
                                                                       "filename_prefix": ["STRING", {}]}}}})

    async def version(_):
        return web.json_response({"version": servers.pack_version()})

    async def upload(request):
        form = await request.post()
        return web.json_response({"name": form["image"].filename, "subfolder": form.get("subfolder", "")})

    async def prompt(request):
        body = await request.json()
        pid, prefix = body["prompt_id"], body["prompt"]["2"]["inputs"]["filename_prefix"]
        log.append((mode, "POST", "/prompt", pid))
        if mode == "ok":
            history[pid] = {"status": {"completed": True, "status_str": "success"},
                            "outputs": {"2": {"images": [{"filename": prefix.split("/")[-1] + "_00001_.png",
                                                          "subfolder": "", "type": "output"}]}}}
            ws = sockets.get(body["client_id"])
            if ws is not None:
                await ws.send_json({"type": "execution_success", "data": {"prompt_id": pid}})
        elif mode == "hang":
            running.append(pid)
        return web.json_response({"prompt_id": pid, "number": 0, "node_errors": {}})

    async def get_history(request):
        pid = request.match_info["pid"]
        return web.json_response({pid: history[pid]} if pid in history else {})

    async def get_queue(_):
        return web.json_response({"queue_running": [[0, p, {}, {}, []] for p in running], "queue_pending": []})

    async def post_queue(request):
        log.append((mode, "POST", "/queue", await request.json()))
        return web.Response()

    async def interrupt(request):
        log.append((mode, "POST", "/interrupt", await request.json()))
        return web.Response()

    async def view(request):
        return web.Response(body=b"\x89PNG fake " + request.query["filename"].encode())

    async def ws_handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sockets[request.query.get("clientId")] = ws
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/system_stats", system_stats)
    app.router.add_get("/object_info", object_info)
    app.router.add_get(f"/extensions/{servers.PACK}/z2i-version.json", version)
    app.router.add_post("/upload/image", upload)
    app.router.add_post("/prompt", prompt)
    app.router.add_get("/history/{pid}", get_history)
    app.router.add_get("/queue", get_queue)
    app.router.add_post("/queue", post_queue)
    app.router.add_post("/interrupt", interrupt)
    app.router.add_get("/view", view)
    app.router.add_get("/ws", ws_handler)
    return app


def _run_against_fakes(modes: list[str], tmp_path: Path, n_images: int, **batch_kw):
    """Run a Batch over n_images against one fake server per mode (depth 1); -> (rc, log, said, out folder)."""
    import asyncio

    from aiohttp import web
    from PIL import Image
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n_images):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(src / f"img{i}.png")
    jobs = servers.read_jobs(None, src, IMAGE_SUFFIXES)
    servers.identify(jobs, "wf")
    log, said, out = [], [], tmp_path / "out"

    async def main():
        runners, urls = [], []
        for mode in modes:
            runner = web.AppRunner(_fake_server(mode, log))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        try:
            batch = servers.Batch(FAULT_PROMPT, jobs, urls, out, apply_sets, depth=1, progress=False,
                                  say=said.append, workflow_hash="wf", **batch_kw)
            batch.poll_s = 0.2
            return await asyncio.wait_for(batch.run(), timeout=60), urls
        finally:
            for runner in runners:
                await runner.cleanup()
    rc, urls = asyncio.run(main())
    return rc, log, said, out, urls


@pytest.mark.parametrize("fault", ["hang", "restart"])
def test_a_hung_or_restarted_server_has_its_job_run_elsewhere(fault, tmp_path):
    """A server that keeps a prompt running past --job-timeout (the prompt is deleted and interrupted there) or
    that forgets it (a restart: neither /queue nor /history has it) is declared gone, and its job runs on the
    other server: every job done once, on the healthy server, its output written."""
    # a short --job-timeout only where the hang is the fault: the restart must be noticed by its own check (three
    # polls missing the prompt), however slow a busy machine makes those polls
    rc, log, said, out, urls = _run_against_fakes([fault, "ok"], tmp_path, 3,
                                                  job_timeout=1.0 if fault == "hang" else 600.0)
    assert rc == 0, said
    entries = _manifest(out)
    assert sorted(e["status"] for e in entries) == ["done"] * 3 and len({e["job"] for e in entries}) == 3, entries
    assert all(e["server"] == urls[1] for e in entries), entries
    assert len(list(out.glob("*.png"))) == 3
    sent = [x[3] for x in log if x[:3] == (fault, "POST", "/prompt")]
    assert len(sent) == 1, log                              # the faulty server got one job, then no more
    reason = "ran past --job-timeout" if fault == "hang" else "lost the prompt (restarted?)"
    assert any(reason in s and "re-queueing" in s for s in said), said
    if fault == "hang":                                     # the hung prompt is deleted and interrupted there
        assert (fault, "POST", "/queue", {"delete": sent}) in log, log
        assert (fault, "POST", "/interrupt", {"prompt_id": sent[0]}) in log, log
