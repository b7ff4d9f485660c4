"""Batch editing across servers (issue 31): images per minute with one and with two local ComfyUI servers, and the
client's own cost per image. Like tools/benchmark.py a tool, not a test.

Starts real ComfyUI servers (the set-up host, this pack, 127.0.0.1 only), warms each up with one job, then runs the
runner's server mode (`python -m z2i.run WORKFLOW --server ...`) over N rendered toy scenes with a fresh output
folder, once with one server and once with two, and reads the client process's CPU time (user + system, from the
kernel's accounting of the finished child) as its overhead. On a machine with few cores two servers share the same
CPUs, so the second server's gain is bounded by them: the numbers say what the client and the protocol cost, not
what two GPU boxes give.

Usage: python tools/benchmark_servers.py [--n 12] [--steps 20] [--workflow workflows/z2i_ddim_img2img.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".host" / "pythonpath"))
sys.path.insert(0, str(REPO / "tools"))


def run_client(workflow: Path, urls: list[str], inputs: Path, out: Path, steps: int, ckpt: str) -> tuple[float, float]:
    """-> (wall seconds, client CPU seconds)"""
    args = [sys.executable, "-m", "z2i.run", str(workflow), "--checkpoint", ckpt, "--no-progress",
            "--input-dir", str(inputs), "--output-dir", str(out), "--set", f"BasicScheduler.steps={steps}"]
    for u in urls:
        args += ["--server", u]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / ".host" / "pythonpath")},
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"client failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workflow", type=Path, default=REPO / "workflows" / "z2i_ddim_img2img.json")
    ap.add_argument("--checkpoint", default="z2i-tiny-sd15.safetensors")
    args = ap.parse_args()
    from toy_world.world import render, scenes
    from z2i.headless.host import find_host
    from z2i.tests.helpers import ComfyServer
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = tmp / "in"
        inputs.mkdir()
        for i, s in enumerate(scenes(args.n, 77)):
            render(s).save(inputs / f"img{i:03d}.png")
        warm = tmp / "warm"
        warm.mkdir()
        render(scenes(1, 78)[0]).save(warm / "warm.png")
        servers = []
        try:
            for k in range(2):
                s = ComfyServer(find_host(), tmp / f"server{k}")
                s.start()
                servers.append(s)
                run_client(args.workflow, [s.url], warm, tmp / f"warm_out{k}", args.steps, args.checkpoint)
            for count in (1, 2):
                urls = [s.url for s in servers[:count]]
                wall, cpu = run_client(args.workflow, urls, inputs, tmp / f"out{count}", args.steps, args.checkpoint)
                rows[count] = {"servers": count, "images": args.n, "seconds": round(wall, 1),
                               "images_per_minute": round(60 * args.n / wall, 2),
                               "client_cpu_s_per_image": round(cpu / args.n, 3)}
                print(json.dumps(rows[count]), flush=True)
        finally:
            for s in servers:
                s.stop()
    print("\n| servers | images | seconds | images / minute | client CPU per image |\n|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['servers']} | {r['images']} | {r['seconds']} | {r['images_per_minute']} | "
              f"{r['client_cpu_s_per_image']} s |")
    print(f"\n(workflow {args.workflow.name}, {args.steps} steps, 64 px toy scenes, {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
