"""The benchmark's plot (docs/benchmark.png), from the results of a run or from the table in BENCHMARKS.md.

    .venv/bin/python tools/plot_benchmark.py [BENCHMARKS.md] [--out docs/benchmark.png]

Two panels against the image side (log2 axis, ticked at the measured sides): each method's time as a multiple of
plain sampling's, and its peak memory above plain sampling's peak; one labelled line per method (SDXL rows as
their own dashed lines with square markers), one legend for both panels below them, and a title naming the
machine and the steps. tools/benchmark.py --write draws it with `plot` from its results; run as a script this
redraws it from the main results table of a written BENCHMARKS.md (columns: model | image | steps | method |
seconds | x plain DDIM | ... | above plain sampling's peak) without measuring anything.

matplotlib is a benchmark-only dependency (tools/requirements-bench.txt): `plot` installs it with
tools/peer_pix2pix_zero.py's ensure_bench_deps into the benchmark's own cache folder, never into the test venv.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
from benchmark import CSG_CACHED, PLAIN  # noqa: E402  (the method names; tools/benchmark.py imports only stdlib)

HEADER = ("model", "image", "steps", "method")

# Colour per method (the same on SD1.5 and SDXL), from matplotlib's tab20 pairs' dark halves and tab10.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#393b79", "#637939", "#843c39", "#7b4173"]
MARKERS = ["o", "v", "^", "D", "P", "X", "<", ">", "h", "p", "*", "d", "H", "8"]


def series_name(method: str) -> str:
    """A method's short name: the part before its parenthesis, CSG with the mask pass's maps told apart."""
    return method.split(" (")[0] + (" (source maps kept)" if method == CSG_CACHED else "")


def machine_of(markdown: str) -> str:
    """The machine of a written BENCHMARKS.md: what its 'Machine:' line says before the first ';'."""
    m = re.search(r"^Machine: ([^;\n]+)", markdown, re.M)
    return m.group(1).strip() if m else ""


def rows_from_markdown(markdown: str) -> list[dict]:
    """The rows of the first table headed model | image | steps | method | ... (the main results), as dicts with
    family, size, steps, method, seconds, ratio and above_plain_mb, like tools/benchmark.py's results."""
    rows: list[dict] = []
    cols: list[str] | None = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            cols = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cols is None:
            if tuple(c.lower() for c in cells[:4]) == HEADER:
                cols = [c.lower() for c in cells]
            continue
        if set(line.replace("|", "").strip()) <= set("-: "):
            continue                                   # the |---| line
        cell = dict(zip(cols, cells))

        def num(col: str) -> float:
            key = next(k for k in cols if k.startswith(col))
            m = re.match(r"[+-]?\d+(\.\d+)?", cell[key])
            if not m:
                raise ValueError(f"no number in column {key!r}: {line}")
            return float(m.group(0))

        rows.append({"family": cell["model"], "size": int(num("image")), "steps": int(num("steps")),
                     "method": cell["method"], "seconds": num("seconds"), "ratio": num("x plain"),
                     "above_plain_mb": num("above plain")})
    if not rows:
        raise ValueError("no table headed | model | image | steps | method | ... found")
    return rows


def _steps_text(rows: list[dict]) -> str:
    by_steps: dict[int, set] = {}
    for r in rows:
        if r.get("steps") is not None:
            by_steps.setdefault(int(r["steps"]), set()).add(r["size"])
    if len(by_steps) == 1:
        return f"{next(iter(by_steps))} DDIM steps"
    return ", ".join(f"{s} steps at {'/'.join(map(str, sorted(sizes)))} px" for s, sizes in
                     sorted(by_steps.items(), key=lambda kv: min(kv[1])))


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        import peer_pix2pix_zero
        peer_pix2pix_zero.ensure_bench_deps()          # tools/requirements-bench.txt, into the benchmark's folder
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(path: Path, rows: list[dict], machine: str = "") -> None:
    """Draw the two panels for `rows` (tools/benchmark.py results or rows_from_markdown) into `path` (PNG)."""
    series: dict[tuple[str, str], list] = {}
    for r in rows:
        if r["method"] == PLAIN:
            continue
        family = r.get("family", "SD1.5")
        series.setdefault((series_name(r["method"]), family), []).append(
            (r["size"], r["ratio"], r.get("above_plain_mb", 0.0)))
    sides = sorted({s for pts in series.values() for s, _, _ in pts})
    if not sides:
        return
    plt = _import_pyplot()
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

    # methods in the order of the table (first appearance), SD1.5 before SDXL; colour and marker per method
    methods = list(dict.fromkeys(name for name, _ in series))
    style = {m: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}
    families = list(dict.fromkeys(f for _, f in series))
    order = sorted(series, key=lambda k: (families.index(k[1]), methods.index(k[0])))

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.6), layout="constrained", dpi=100)
    panels = [(axes[0], 1, "Time ratio to plain sampling", "× plain sampling's time (median)", 1.0),
              (axes[1], 2, "Extra memory above plain sampling's peak", "MB of peak RSS above plain sampling's", 0.0)]
    handles = {}
    for ax, idx, title, ylabel, ref in panels:
        ref_line = ax.axhline(ref, color="0.35", lw=1.2, ls=":", zorder=1)
        for key in order:
            name, family = key
            color, marker = style[name]
            pts = sorted(series[key])
            sdxl = family != "SD1.5"
            label = f"{name} [{family}]" if sdxl else name
            (line,) = ax.plot([p[0] for p in pts], [p[idx] for p in pts], color=color, marker="s" if sdxl else marker,
                              ls="--" if sdxl else "-", lw=1.8, ms=7 if sdxl else 6, label=label, zorder=3,
                              mfc="white" if sdxl else color, mew=1.6)
            handles.setdefault(label, line)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sides))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(s) for s in sides])
        lo, hi = math.log2(sides[0]), math.log2(sides[-1])
        pad = max(hi - lo, 1.0) * 0.08
        ax.set_xlim(2 ** (lo - pad), 2 ** (hi + pad))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11.5)
        ax.grid(True, which="major", color="0.88", lw=0.8, zorder=0)
    axes[0].set_ylim(bottom=0)
    handles["plain ComfyUI DDIM sampling (1×, +0 MB)"] = ref_line
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=4, frameon=False,
               fontsize=9.5, handlelength=3)
    what = "Z2I methods against plain ComfyUI DDIM sampling (tiny random SD1.5/SDXL-topology checkpoints)"
    where = "; ".join(x for x in (machine, _steps_text(rows)) if x)
    fig.suptitle(f"{what}\n{where}" if where else what, fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("markdown", type=Path, nargs="?", default=REPO / "BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmark.png")
    args = ap.parse_args(argv)
    text = args.markdown.read_text()
    rows = rows_from_markdown(text)
    plot(args.out, rows, machine_of(text))
    print(f"{args.out}: {len(rows)} rows of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
