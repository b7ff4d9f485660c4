"""Measure how much the guided methods' results move between identical reruns and between thread counts.

    PYTHONPATH=.host/pythonpath .venv/bin/python tools/determinism_probe.py [--reruns 3] [--threads 2,1]

For each method (pix2pix-zero with a batch of two identical images, zeroCon, AGG with the CLIP style loss and
cutouts, CSG with its mask and mixup, Asyrp) the graph of the tests is run `--reruns` times from a fresh cache
at each thread count, in this one process. Printed per method: the largest relative difference between reruns
at the same thread count (0 means bit-for-bit repeatable), between the two rows of the batch where there are
two identical rows, and between the first two thread counts. Run it on an idle machine and again while other
CPU-heavy work runs (e.g. two `python -c "while True: pass"`) to see whether load moves anything.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".host" / "pythonpath"))


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reruns", type=int, default=3)
    ap.add_argument("--threads", default="2,1")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from z2i.headless.host import Host
    from z2i.tests import test_agg_nodes, test_asyrp_nodes, test_csg_nodes, test_pix2pix_zero
    host = Host.get()
    ck = "z2i-tiny-sd15.safetensors"
    graphs = {
        "pix2pix-zero (batch of 2 identical rows)": test_pix2pix_zero.graph(ck, 0.1, batch=2),
        "zeroCon": test_pix2pix_zero.graph(ck, 0.1, sampler=dict(test_pix2pix_zero.ZEROCON)),
        "AGG + CLIP style loss, 2 cutouts": test_agg_nodes.style_graph(ck, cutouts=2),
        "CSG mask + mixup + sampler": test_csg_nodes.graph(ck),
        "Asyrp (derived direction)": test_asyrp_nodes.graph(ck),
    }
    print(f"torch {torch.__version__}, os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()}")
    for name, prompt in graphs.items():
        by_threads = {}
        for t in threads:
            torch.set_num_threads(t)
            outs = []
            t0 = time.time()
            for _ in range(args.reruns):
                outs.append(host.run_prompt(prompt, targets=["s"], fresh_cache=True).output("s", 0)["samples"])
            by_threads[t] = outs
            reruns = max(rel(o, outs[0]) for o in outs[1:]) if len(outs) > 1 else float("nan")
            rows = rel(outs[0][1], outs[0][0]) if outs[0].shape[0] == 2 else None
            print(f"{name:42s} threads={t}: reruns max rel {reruns:.3g}"
                  + (f", row 1 vs row 0 {rows:.3g}" if rows is not None else "")
                  + f"  ({(time.time() - t0) / args.reruns:.1f} s/run)", flush=True)
        if len(threads) > 1:
            print(f"{'':42s} threads {threads[0]} vs {threads[1]}: rel "
                  f"{rel(by_threads[threads[1]][0], by_threads[threads[0]][0]):.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
