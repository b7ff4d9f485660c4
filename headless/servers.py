"""Batch edits across running ComfyUI servers (issue 31): the runner's server mode.

`python -m z2i.run WORKFLOW --server URL [--server URL ...] [--jobs jobs.csv|jsonl] [--input-dir DIR]` sends the
graph once per job to ComfyUI servers that are already running (one per GPU box, as SwarmUI or ComfyUI-Distributed
drive them), through ComfyUI's own HTTP and websocket API only: /object_info and /system_stats (preflight),
/upload/image, /prompt, /ws (progress and completion), /history, /view (outputs), /interrupt and /queue (Ctrl-C,
hung jobs). Nothing runs server-side but the pack's nodes.

- Jobs: one per image of --input-dir, or one per row of --jobs (CSV with a header, or JSON lines): `image` (a
  path, relative to --input-dir or the jobs file), any `NODE.INPUT` key as in --set, and the shortcuts `caption`
  (the text of the node titled "Source prompt (caption)" or "Caption (source)"), `source` / `target` (Edit
  Direction's words), `seed` (every `seed` / `noise_seed` input). A job's id is a hash of its image's bytes, the
  workflow and its parameters: the same row is the same job in every run.
- Scheduling: each server keeps up to --depth prompts queued; a job goes to whichever server has room.
- Outputs: every image a job's output nodes produce is downloaded to --output-dir as `<stem>_<k>_.png` (the
  in-process runner's names: SaveImage's prefix is the image's stem, or `<stem>_<job hash>` for a row with
  parameters), written atomically; a job whose names are all present is never run again.
- Manifest (<output-dir>/manifest.jsonl, one line per finished job: input file hash, workflow hash, parameters,
  server, prompt id, output files, seconds, error): a rerun skips done jobs, retries failed ones up to
  --max-attempts in all, and never retries a graph the server refused at validation (the same input fails the
  same way).
- Faults: a server that stops answering, hangs past --job-timeout or restarts (its queue and history lose the
  prompt) has its jobs re-queued on the others, each at most --retries times per run; a job that raises in a node
  is recorded with the server's message. Ctrl-C deletes this run's queued prompts, interrupts its running ones on
  every server, and leaves the manifest with only finished jobs.
- Authentication: Z2I_SERVER_TOKEN (sent as `Authorization: Bearer ...`) or Z2I_SERVER_HEADER ("Name: value"),
  from the environment only, on every request and the websocket; http and https (wss) URLs.
"""
from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

UPLOAD_SUBFOLDER = "z2i_batch"
OUTPUT_SUBFOLDER = "z2i_batch"
CAPTION_TITLES = ("Source prompt (caption)", "Caption (source)")
PACK = "z2i"


class BatchError(RuntimeError):
    """A problem the user must fix before the batch can run (preflight, jobs file); the message says what."""


# -- jobs ----------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    image: Path | None
    params: dict[str, Any]
    row: int
    id: str = ""
    prefix: str = ""
    image_sha256: str = ""
    attempts: int = 0
    outputs: list[str] = field(default_factory=list)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_jobs(jobs_file: Path | None, input_dir: Path | None, image_suffixes) -> list[Job]:
    """Jobs from a CSV / JSONL file (one per row) or one per image of input_dir."""
    if jobs_file is None:
        if input_dir is None:
            return [Job(None, {}, 0)]
        images = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in image_suffixes)
        if not images:
            raise BatchError(f"no images in {input_dir}")
        return [Job(p, {}, i + 1) for i, p in enumerate(images)]
    if not jobs_file.is_file():
        raise BatchError(f"--jobs {jobs_file}: no such file")
    text = jobs_file.read_text()
    rows: list[dict] = []
    if jobs_file.suffix.lower() in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BatchError(f"{jobs_file.name} line {i}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise BatchError(f"{jobs_file.name} line {i}: expected an object of column: value")
                rows.append(row)
    else:
        for row in csv.DictReader(text.splitlines()):
            rows.append({k.strip(): _cell(v) for k, v in row.items() if k and v is not None and v.strip() != ""})
    base = input_dir if input_dir is not None else jobs_file.parent
    out = []
    for i, row in enumerate(rows, 1):
        row = dict(row)
        image = row.pop("image", None)
        path = None
        if image is not None:
            path = Path(str(image))
            if not path.is_absolute():
                path = base / path
            if not path.is_file():
                raise BatchError(f"{jobs_file.name} row {i}: image {image} not found (looked in {base})")
        out.append(Job(path, row, i))
    if not out:
        raise BatchError(f"{jobs_file.name}: no rows")
    return out


def _cell(v: str):
    v = v.strip()
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def expand_params(prompt: dict, params: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """A job's parameters -> (node, input, value) assignments as --set makes them."""
    sets = []
    for key, value in params.items():
        if key == "caption":
            hits = [nid for nid, n in prompt.items() if n.get("_meta", {}).get("title") in CAPTION_TITLES]
            if not hits:
                raise BatchError("a job sets 'caption' but the workflow has no node titled "
                                 + " or ".join(repr(t) for t in CAPTION_TITLES) + "; use NODE.text instead")
            sets += [(h, "text", value) for h in hits]
        elif key in ("source", "target"):
            hits = [nid for nid, n in prompt.items() if n["class_type"] == "Z2I_EditDirection"]
            if not hits:
                raise BatchError(f"a job sets '{key}' but the workflow has no Z2I_EditDirection node")
            sets += [(h, key, value) for h in hits]
        elif key == "seed":
            hits = [(nid, name) for nid, n in prompt.items() for name in n["inputs"]
                    if name in ("seed", "noise_seed") and not isinstance(n["inputs"][name], list)]
            if not hits:
                raise BatchError("a job sets 'seed' but no node of the workflow has a seed input")
            sets += [(nid, name, value) for nid, name in hits]
        else:
            node, dot, name = key.rpartition(".")
            if not dot or not node or not name:
                raise BatchError(f"job column {key!r}: expected image, caption, source, target, seed or NODE.INPUT")
            sets.append((node, name, value))
    return sets


def job_prompt(prompt: dict, job: Job, apply_sets: Callable) -> dict:
    p = json.loads(json.dumps(prompt))
    apply_sets(p, expand_params(p, job.params))
    return p


def identify(jobs: list[Job], workflow_hash: str) -> None:
    """Each job's id (image bytes + workflow + parameters) and output prefix (stable across runs)."""
    stems: dict[str, int] = {}
    for job in jobs:
        job.image_sha256 = _sha256(job.image.read_bytes()) if job.image else ""
        key = json.dumps({"image": job.image_sha256, "name": job.image.name if job.image else None,
                          "workflow": workflow_hash, "params": job.params}, sort_keys=True)
        job.id = _sha256(key.encode())[:16]
        stem = job.image.stem if job.image else "job"
        job.prefix = stem if not job.params else f"{stem}_{job.id[:8]}"
        stems[job.prefix] = stems.get(job.prefix, 0) + 1
    dup = [p for p, n in stems.items() if n > 1]
    if dup:
        raise BatchError(f"several jobs would write the same outputs ({', '.join(dup[:3])}): two rows are identical "
                         "or two images share a name")


# -- manifest ------------------------------------------------------------------------------------------------------
class Manifest:
    """JSON lines, one per finished job (done or failed); appended and flushed line by line."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list[dict]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue            # a line cut by a crash: that job did not finish
                self.entries.setdefault(e["job"], []).append(e)

    def done(self, job: Job, output_dir: Path) -> bool:
        return any(e["status"] == "done" and all((output_dir / o).exists() for o in e["outputs"])
                   for e in self.entries.get(job.id, []))

    def attempts(self, job: Job) -> int:
        return sum(1 for e in self.entries.get(job.id, []) if e["status"] != "done")

    def invalid(self, job: Job) -> bool:
        return any(e["status"] == "invalid" for e in self.entries.get(job.id, []))

    def append(self, entry: dict) -> None:
        self.entries.setdefault(entry["job"], []).append(entry)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():                    # a line cut by a crash must not swallow this one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


# -- servers -------------------------------------------------------------------------------------------------------
def auth_headers() -> dict[str, str]:
    headers = {}
    token = os.environ.get("Z2I_SERVER_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    raw = os.environ.get("Z2I_SERVER_HEADER")
    if raw:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise BatchError("Z2I_SERVER_HEADER must be 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


class ServerGone(Exception):
    """The server stopped answering (connection refused / reset / timed out)."""


class Rejected(Exception):
    """The server refused the prompt at validation (HTTP 400): final for this job."""


class JobFailed(Exception):
    """A node raised on the server: recorded with the server's message."""


@dataclass
class Server:
    url: str
    session: Any = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    alive: bool = True
    busy: int = 0
    done: int = 0
    started: float = field(default_factory=time.time)
    current: str = ""
    waiters: dict[str, asyncio.Future] = field(default_factory=dict)
    ws_task: Any = None
    running: set[str] = field(default_factory=set)

    @property
    def ws_url(self) -> str:
        u = self.url.rstrip("/")
        return ("wss://" + u[len("https://"):] if u.startswith("https://") else "ws://" + u[len("http://"):]) \
            + f"/ws?clientId={self.client_id}"

    async def request(self, method: str, path: str, timeout: float = 30.0, **kw):
        import aiohttp
        try:
            async with self.session.request(method, self.url.rstrip("/") + path,
                                            timeout=aiohttp.ClientTimeout(total=timeout), **kw) as r:
                body = await r.read()
                return r.status, body
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
            raise ServerGone(f"{self.url}: {e.__class__.__name__}: {e}") from None

    async def get_json(self, path: str, timeout: float = 30.0):
        status, body = await self.request("GET", path, timeout)
        if status != 200:
            raise BatchError(f"{self.url}{path}: HTTP {status}" + (" (check Z2I_SERVER_TOKEN / Z2I_SERVER_HEADER)"
                                                                     if status in (401, 403) else ""))
        return json.loads(body)


def pack_version() -> str:
    import tomllib
    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]


async def preflight(server: Server, prompt: dict, version: str) -> dict:
    """Reachable, the same pack version, every node type and every model / file the graph names. -> object_info"""
    try:
        stats = await server.get_json("/system_stats", timeout=15)
        info = await server.get_json("/object_info", timeout=60)
    except ServerGone as e:
        raise BatchError(f"server {server.url} is not reachable ({e})") from None
    missing = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in info})
    if missing:
        z2i = [m for m in missing if m.startswith("Z2I_")]
        raise BatchError(f"server {server.url} lacks the node types {', '.join(missing)}"
                         + (" (the Z2I pack is not installed there)" if z2i else " (a custom node pack is missing)"))
    status, body = await server.request("GET", f"/extensions/{PACK}/z2i-version.json", 15)
    theirs = json.loads(body).get("version") if status == 200 else None
    if theirs != version:
        raise BatchError(f"server {server.url} runs Z2I {theirs or 'of an unknown version (older than 0.1.0)'}, "
                         f"this runner is Z2I {version}: install the same version on every server")
    for nid, node in prompt.items():
        spec = info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, s in (spec.get(section) or {}).items():
                if name not in node["inputs"] or isinstance(node["inputs"][name], list):
                    continue
                options = s[0] if isinstance(s[0], list) else (s[1] or {}).get("options") \
                    if s[0] == "COMBO" and len(s) > 1 else None
                if options is None or name == "image":
                    continue
                if node["inputs"][name] not in options:
                    title = node.get("_meta", {}).get("title", node["class_type"])
                    raise BatchError(f"server {server.url} lacks {node['inputs'][name]!r} for {title} (node {nid}) "
                                     f"input '{name}': it has {', '.join(map(str, options[:5]))}"
                                     + (" ..." if len(options) > 5 else ""))
    return {"system": stats.get("system", {}), "object_info": info}


# -- running -------------------------------------------------------------------------------------------------------
class Batch:
    def __init__(self, prompt: dict, jobs: list[Job], urls: list[str], output_dir: Path, apply_sets: Callable,
                 depth: int = 2, job_timeout: float = 1800.0, retries: int = 3, max_attempts: int = 3,
                 progress: bool = True, say: Callable[[str], None] = print, workflow_hash: str = ""):
        self.prompt, self.jobs, self.output_dir = prompt, jobs, Path(output_dir)
        self.servers = [Server(u.rstrip("/")) for u in urls]
        self.apply_sets, self.depth, self.job_timeout = apply_sets, depth, job_timeout
        self.retries, self.max_attempts, self.say = retries, max_attempts, say
        self.poll_s = 2.0                   # how often a waiting job polls /history and /queue (see _wait)
        self.show_progress = progress
        self.workflow_hash = workflow_hash
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.output_dir / "manifest.jsonl")
        self.bar = None
        self.failed: list[tuple[Job, str]] = []
        self.written: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]
        self.savers = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
        self.loaders = [nid for nid, n in prompt.items() if n["class_type"] == "LoadImage"]

    # progress ----------------------------------------------------------------------------------------------
    def _postfix(self) -> None:
        if self.bar is None:
            return
        parts = []
        for s in self.servers:
            mins = max(time.time() - s.started, 1e-9) / 60
            state = "down" if not s.alive else (s.current or "idle")
            parts.append(f"{s.url.split('//')[-1]} {s.done / mins:.1f}/min [{state}]")
        self.bar.set_postfix_str("; ".join(parts), refresh=True)

    # websocket ---------------------------------------------------------------------------------------------
    async def _listen(self, server: Server) -> None:
        """Completion and progress events of this client's prompts; on a drop, reconnect until the server is
        declared gone (each waiter then learns it from its own polling)."""
        import aiohttp
        while server.alive:
            try:
                async with server.session.ws_connect(server.ws_url, heartbeat=10) as ws:
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        self._on_event(server, json.loads(msg.data))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(1.0)

    def _on_event(self, server: Server, msg: dict) -> None:
        kind, data = msg.get("type"), msg.get("data") or {}
        pid = data.get("prompt_id")
        if kind == "executing" and pid in server.running:
            node = data.get("node")
            n = self.prompt.get(str(node).split(":")[0], {}) if node else {}
            server.current = n.get("_meta", {}).get("title", n.get("class_type", "")) if node else ""
            self._postfix()
        elif kind in ("execution_success", "execution_error", "execution_interrupted") and pid in server.waiters:
            fut = server.waiters.pop(pid)
            if not fut.done():
                fut.set_result((kind, data))

    # one job on one server -----------------------------------------------------------------------------------
    async def _upload(self, server: Server, job: Job) -> str:
        import aiohttp
        name = f"{job.image_sha256[:16]}{job.image.suffix.lower()}"
        form = aiohttp.FormData()
        form.add_field("image", job.image.read_bytes(), filename=name)
        form.add_field("subfolder", UPLOAD_SUBFOLDER)
        form.add_field("overwrite", "true")
        status, body = await server.request("POST", "/upload/image", 120, data=form)
        if status != 200:
            raise JobFailed(f"upload refused: HTTP {status} {body[:200]!r}")
        got = json.loads(body)
        return f"{got.get('subfolder') or ''}/{got['name']}".lstrip("/")

    async def _run_on(self, server: Server, job: Job) -> dict:
        t0 = time.time()
        prompt = job_prompt(self.prompt, job, self.apply_sets)
        if job.image is not None:
            if not self.loaders:
                raise BatchError("jobs name images but the workflow has no LoadImage node")
            ref = await self._upload(server, job)
            for nid in self.loaders:
                prompt[nid]["inputs"]["image"] = ref
        for nid in self.savers:
            prompt[nid]["inputs"]["filename_prefix"] = f"{OUTPUT_SUBFOLDER}/{self.run_id}/{job.prefix}"
        pid = str(uuid.uuid4())
        fut = asyncio.get_running_loop().create_future()
        server.waiters[pid] = fut
        server.running.add(pid)
        try:
            status, body = await server.request("POST", "/prompt", 60, json={
                "prompt": prompt, "client_id": server.client_id, "prompt_id": pid})
            if status == 400:
                err = json.loads(body)
                raise Rejected(_validation_message(err))
            if status != 200:
                raise ServerGone(f"{server.url}/prompt: HTTP {status}")
            kind, data = await self._wait(server, pid, fut)
        finally:
            server.waiters.pop(pid, None)
            server.running.discard(pid)
        if kind == "execution_error":
            raise JobFailed(f"{data.get('node_type', '?')} (node {data.get('node_id', '?')}) failed: "
                            f"{data.get('exception_type', '')}: {str(data.get('exception_message', '')).strip()}")
        if kind == "execution_interrupted":
            raise ServerGone(f"{server.url}: the prompt was interrupted on the server")
        files = await self._download(server, pid, job)
        return {"prompt_id": pid, "outputs": files, "seconds": round(time.time() - t0, 2)}

    async def _wait(self, server: Server, pid: str, fut: asyncio.Future):
        """The websocket's completion event, with /history and /queue polled so that a dropped socket, a dead
        server, a restarted one (the prompt is in neither) and a hang (past job_timeout) are all noticed."""
        deadline = time.time() + self.job_timeout
        misses = 0
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout=self.poll_s)
            except asyncio.TimeoutError:
                pass
            if not server.alive:                # another of its jobs found it gone
                raise ServerGone(f"{server.url}: stopped answering")
            if time.time() > deadline:
                await self._interrupt(server, pid)
                raise ServerGone(f"{server.url}: the job ran past --job-timeout {self.job_timeout:.0f} s")
            try:
                status, body = await server.request("GET", f"/history/{pid}", 10)
                hist = json.loads(body) if status == 200 else {}
                if pid in hist:
                    st = hist[pid].get("status", {})
                    if st.get("completed") or st.get("status_str") == "success":
                        return "execution_success", {"prompt_id": pid}
                    if st.get("status_str") == "error":
                        msg = next((m[1] for m in st.get("messages", []) if m[0] == "execution_error"), {})
                        return "execution_error", msg
                status, body = await server.request("GET", "/queue", 10)
                q = json.loads(body) if status == 200 else {}
                queued = {item[1] for key in ("queue_running", "queue_pending") for item in q.get(key, [])}
                misses = 0 if (pid in queued or pid in hist) else misses + 1
                if misses >= 3:          # neither queued, running nor in history: the server restarted
                    raise ServerGone(f"{server.url}: the server lost the prompt (restarted?)")
            except ServerGone:
                server.alive = False
                raise

    async def _download(self, server: Server, pid: str, job: Job) -> list[str]:
        # ComfyUI sends execution_success before it files the prompt in its history: poll briefly for it
        entry = None
        for _ in range(100):
            status, body = await server.request("GET", f"/history/{pid}", 30)
            entry = json.loads(body).get(pid) if status == 200 else None
            if entry is not None:
                break
            await asyncio.sleep(0.1)
        if entry is None:
            raise ServerGone(f"{server.url}: prompt {pid} finished but never appeared in /history")
        outs = entry.get("outputs", {})
        images = [img for nid in sorted(outs, key=str) for img in outs[nid].get("images", [])
                  if img.get("type") == "output"]
        files = []
        for k, img in enumerate(images, 1):
            q = {"filename": img["filename"], "subfolder": img.get("subfolder", ""), "type": "output"}
            status, data = await server.request("GET", "/view", 120, params=q)
            if status != 200:
                raise ServerGone(f"{server.url}/view {img['filename']}: HTTP {status}")
            name = f"{job.prefix}_{k:05d}_.png"
            tmp = self.output_dir / f".{name}.{uuid.uuid4().hex[:6]}.part"
            tmp.write_bytes(data)
            tmp.replace(self.output_dir / name)
            files.append(name)
        return files

    async def _interrupt(self, server: Server, pid: str) -> None:
        try:
            await server.request("POST", "/queue", 10, json={"delete": [pid]})
            await server.request("POST", "/interrupt", 10, json={"prompt_id": pid})
        except ServerGone:
            pass

    # the scheduler --------------------------------------------------------------------------------------------
    async def run(self) -> int:
        import aiohttp
        from tqdm import tqdm
        version = pack_version()
        todo = []
        skipped = 0
        for job in self.jobs:
            if self.manifest.done(job, self.output_dir):
                skipped += 1
            elif self.manifest.invalid(job):
                skipped += 1
                self.failed.append((job, "refused at validation in an earlier run (see manifest.jsonl)"))
            elif self.manifest.attempts(job) >= self.max_attempts:
                skipped += 1
                self.failed.append((job, f"failed {self.manifest.attempts(job)} times in earlier runs"))
            else:
                todo.append(job)
        if not todo:                        # nothing to send: no server needs to be up
            self.say(f"summary: 0 run, {skipped} skipped (done or failed before), nothing to do")
            for job, err in self.failed:
                self.say(f"failed: {job.image.name if job.image else f'row {job.row}'}: {err}")
            return 1 if self.failed else 0
        headers = auth_headers()
        async with aiohttp.ClientSession(headers=headers) as session:
            for s in self.servers:
                s.session = session
            await asyncio.gather(*(preflight(s, self.prompt, version) for s in self.servers))
            self.bar = tqdm(total=len(todo), unit="image", disable=not self.show_progress, dynamic_ncols=True)
            for s in self.servers:
                s.ws_task = asyncio.create_task(self._listen(s))
            queue: asyncio.Queue = asyncio.Queue()
            for job in todo:
                queue.put_nowait(job)
            remaining = {"n": len(todo)}
            workers = [asyncio.create_task(self._worker(s, queue, remaining))
                       for s in self.servers for _ in range(self.depth)]
            try:
                await asyncio.gather(*workers)
            except (asyncio.CancelledError, KeyboardInterrupt):
                await self._cancel_all()
                raise
            finally:
                for w in workers:
                    w.cancel()
                for s in self.servers:
                    if s.ws_task:
                        s.ws_task.cancel()
                self.bar.close()
        run = len(todo) - len([f for f in self.failed if f[0] in todo])
        self.say(f"summary: {run} run, {skipped} skipped, {len(self.failed)} failed, {len(self.written)} images "
                 f"written to {self.output_dir}")
        for job, err in self.failed:
            self.say(f"failed: {job.image.name if job.image else f'row {job.row}'}: {err}")
        return 1 if self.failed else 0

    async def _worker(self, server: Server, queue: asyncio.Queue, remaining: dict) -> None:
        while remaining["n"] > 0:
            if not server.alive:
                if not any(s.alive for s in self.servers):
                    while not queue.empty():
                        job = queue.get_nowait()
                        self._record(job, server, None, "failed", "every server stopped answering")
                        remaining["n"] -= 1
                return
            try:
                job = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                continue
            job.attempts += 1
            server.busy += 1
            try:
                res = await self._run_on(server, job)
            except Rejected as e:
                self._record(job, server, None, "invalid", str(e))
                remaining["n"] -= 1
            except JobFailed as e:
                self._record(job, server, None, "failed", str(e))
                remaining["n"] -= 1
            except ServerGone as e:
                server.alive = False
                server.current = ""
                if job.attempts > self.retries:
                    self._record(job, server, None, "failed", f"{e} (tried {job.attempts} times)")
                    remaining["n"] -= 1
                else:
                    self.say(f"{server.url} stopped answering ({e}); re-queueing {job.prefix}")
                    queue.put_nowait(job)
                self._postfix()
            else:
                self._record(job, server, res, "done", None)
                server.done += 1
                remaining["n"] -= 1
            finally:
                server.busy -= 1

    def _record(self, job: Job, server: Server, res: dict | None, status: str, error: str | None) -> None:
        entry = {"job": job.id, "status": status, "image": str(job.image) if job.image else None,
                 "image_sha256": job.image_sha256, "workflow_sha256": self.workflow_hash, "params": job.params,
                 "server": server.url, "prompt_id": res["prompt_id"] if res else None,
                 "outputs": res["outputs"] if res else [], "seconds": res["seconds"] if res else None,
                 "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.manifest.append(entry)
        if res:
            self.written += res["outputs"]
        else:
            self.failed.append((job, error or status))
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    async def _cancel_all(self) -> None:
        """Ctrl-C: delete this run's queued prompts and interrupt its running ones, on every live server."""
        # snapshot first: the cancelled workers drop their prompt ids as soon as this coroutine first awaits
        for s, ids in [(s, list(s.running)) for s in self.servers]:
            if not ids or not s.alive:
                continue
            try:
                await s.request("POST", "/queue", 10, json={"delete": ids})
                for pid in ids:
                    await s.request("POST", "/interrupt", 10, json={"prompt_id": pid})
            except ServerGone:
                pass


def _validation_message(err: dict) -> str:
    e = err.get("error", {})
    parts = [e.get("message", "invalid prompt") + (f": {e.get('details')}" if e.get("details") else "")]
    for nid, ne in (err.get("node_errors") or {}).items():
        for x in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type', '?')}): {x.get('message', '')} {x.get('details', '')}"
                         .strip())
    return "; ".join(parts)


def fetch_object_info(url: str) -> dict:
    """/object_info of one server, synchronously (the UI -> API conversion needs the server's node schemas)."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url.rstrip("/") + "/object_info", headers=auth_headers())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError) as e:
        raise BatchError(f"server {url} is not reachable ({e})") from None


def run_batch(args, data: dict, say: Callable[[str], None], show_progress: bool, apply_sets: Callable,
              parse_set: Callable, image_suffixes) -> int:
    """The runner's server mode (python -m z2i.run ... --server URL): see the module docstring."""
    from .workflow import WorkflowError, is_api_format, ui_to_api
    try:
        info, errors = None, []
        for url in args.server:             # the node schemas of the first server that answers (for UI -> API)
            try:
                info = fetch_object_info(url)
                break
            except BatchError as e:
                errors.append(str(e))
        if info is None:
            raise BatchError("; ".join(errors))
        if is_api_format(data):
            prompt = data
        else:
            prompt = ui_to_api(data, lambda cls: info[cls]["input"], known_types=set(info))
        if args.checkpoint:
            for n in prompt.values():
                if n["class_type"] == "CheckpointLoaderSimple":
                    n["inputs"]["ckpt_name"] = Path(args.checkpoint).name
        apply_sets(prompt, parse_set(args.set))
        jobs = read_jobs(args.jobs, args.input_dir, image_suffixes)
        wf = workflow_hash(prompt)
        identify(jobs, wf)
        for job in jobs:                    # every row's keys resolve before anything is sent
            job_prompt(prompt, job, apply_sets)
        batch = Batch(prompt, jobs, args.server, args.output_dir, apply_sets, depth=args.depth,
                      job_timeout=args.job_timeout, retries=args.retries, max_attempts=args.max_attempts,
                      progress=show_progress, say=say, workflow_hash=wf)
        try:
            return asyncio.run(batch.run())
        except KeyboardInterrupt:
            say("interrupted: this run's prompts were deleted / interrupted on the servers; manifest.jsonl holds "
                "the finished jobs, rerun to resume")
            return 130
    except (BatchError, WorkflowError) as e:
        say(f"error: {e}")
        return 2
    except SystemExit as e:              # apply_sets' messages (an unknown node in --set or a job column)
        say(f"error: {e}")
        return 2


def workflow_hash(prompt: dict) -> str:
    return _sha256(json.dumps(prompt, sort_keys=True).encode())[:16]
