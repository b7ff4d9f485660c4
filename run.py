"""Run a ComfyUI workflow headless, once or over a folder of images.

    python -m z2i.run WORKFLOW.json [--set NODE.INPUT=VALUE ...] [--checkpoint NAME_OR_PATH]
                      [--input-dir DIR] [--output-dir DIR] [--comfyui DIR] [--progress | --no-progress]

WORKFLOW is a UI-format file (as saved from ComfyUI, or one of workflows/) or an API-format prompt.
NODE in --set is a node id, a node title, or a class type (all nodes of that type); a node inside a
subgraph has the id "<subgraph node id>:<its id in the subgraph>" (nested: "12:5:3"). VALUE is parsed as
JSON when it can be (numbers, true/false), else taken as a string.
With --input-dir every image in DIR goes through the graph in turn (each LoadImage node gets it); images
whose outputs already exist in --output-dir are skipped, so an interrupted batch resumes where it stopped.
The first failure stops the run with a message naming the image and the node, and a non-zero exit.
On a terminal, progress bars like the frontend's go to stderr: one over the images of an --input-dir run and,
while a prompt runs, one per node that reports steps (its title or class, step k/N); --quiet or a stderr that
is not a terminal turns them off, --progress / --no-progress forces them on or off.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def parse_set(items: list[str]) -> list[tuple[str, str, object]]:
    out = []
    for item in items:
        target, sep, raw = item.partition("=")
        node, dot, name = target.rpartition(".")
        if not sep or not dot or not node or not name:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. --set 7.steps=30")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((node, name, value))
    return out


def apply_sets(prompt: dict, sets: list[tuple[str, str, object]]) -> None:
    for node, name, value in sets:
        hits = [nid for nid, n in prompt.items()
                if nid == node or n.get("_meta", {}).get("title") == node or n["class_type"] == node]
        if not hits:
            raise SystemExit(f"--set {node}.{name}: no node with that id, title or type in the workflow")
        for nid in hits:
            prompt[nid]["inputs"][name] = value


class Progress:
    """tqdm bars on stderr driven by the messages ComfyUI's executor sends (Host.add_listener): "progress"
    {value, max, node} opens or moves the bar of that node, "progress_state" closes it when the node is finished;
    `images` is the bar over the images of an --input-dir run. With enabled=False it only prints `say` lines."""

    def __init__(self, enabled: bool, images: int = 0):
        self.enabled = enabled
        self.prompt: dict = {}
        self.nodes: dict = {}                    # node id -> tqdm bar, while that node runs
        self.ids: dict = {}                      # node id -> (real node id, display node id) from progress_state
        self.images = None
        self._redirect = None
        if enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._tqdm = tqdm
            self._redirect = logging_redirect_tqdm()     # ComfyUI's log lines above the bars, not through them
            self._redirect.__enter__()
            if images:
                self.images = tqdm(total=images, desc="images", unit="image", file=sys.stderr, dynamic_ncols=True)

    def say(self, line: str) -> None:
        """A line on stderr (above the bars when they are shown)."""
        if self.enabled:
            self._tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def image_done(self) -> None:
        if self.images is not None:
            self.images.update(1)

    def start_prompt(self, prompt: dict) -> None:
        self.prompt, self.ids = prompt, {}

    def label(self, node: str) -> str:
        for nid in (node, *self.ids.get(node, ())):
            n = self.prompt.get(str(nid))
            if n is not None:
                return f"{n.get('_meta', {}).get('title') or n['class_type']} #{node}"
        return f"node {node}"

    def on_event(self, event: str, data) -> None:
        if not self.enabled or not isinstance(data, dict):
            return
        if event == "progress" and data.get("node") is not None:
            node, value, total = str(data["node"]), data.get("value") or 0, data.get("max") or 0
            bar = self.nodes.get(node)
            if bar is None:
                bar = self.nodes[node] = self._tqdm(total=total, desc=self.label(node), unit="step", leave=False,
                                                    file=sys.stderr, dynamic_ncols=True)
            if total and total != bar.total:
                bar.total = total
            if value < bar.n:                        # the node started a second loop
                bar.reset(total=total or bar.total)
            bar.update(value - bar.n)
        elif event == "progress_state":
            for nid, st in (data.get("nodes") or {}).items():
                self.ids[str(nid)] = tuple(x for x in (st.get("real_node_id"), st.get("display_node_id")) if x)
                if str(nid) in self.nodes and st.get("state") in ("finished", "error"):
                    self.finish_node(str(nid))

    def finish_node(self, node: str) -> None:
        bar = self.nodes.pop(node, None)
        if bar is not None:
            bar.refresh()                            # its last step drawn even when it came within mininterval
            bar.close()

    def end_prompt(self) -> None:
        for node in list(self.nodes):
            self.finish_node(node)

    def close(self) -> None:
        self.end_prompt()
        if self.images is not None:
            self.images.close()
            self.images = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m z2i.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    ap.add_argument("--checkpoint", help="checkpoint file name in models/checkpoints, or a path to one; "
                                         "replaces ckpt_name in every CheckpointLoaderSimple")
    ap.add_argument("--input-dir", type=Path, help="run the graph once per image in this folder")
    ap.add_argument("--output-dir", type=Path, default=Path("output"), help="where images are written")
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $Z2I_COMFYUI, else the one tools/setup.sh made)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="where ComfyUI computes (default: $Z2I_DEVICE, else auto = CUDA when a GPU is seen)")
    ap.add_argument("-q", "--quiet", action="store_true", help="only errors from ComfyUI (hides its start-up import warnings)")
    srv = ap.add_argument_group("server mode (batch editing on running ComfyUI servers; docs/HEADLESS_RUNNER.md)")
    srv.add_argument("--server", action="append", default=[], metavar="URL",
                     help="a running ComfyUI server with this pack (repeat for several); the jobs go there instead "
                          "of an in-process ComfyUI. Auth from $Z2I_SERVER_TOKEN or $Z2I_SERVER_HEADER only")
    srv.add_argument("--jobs", type=Path, help="per-image parameters, one job per row (CSV with a header or JSON "
                                               "lines): image, caption, source, target, seed, NODE.INPUT")
    srv.add_argument("--depth", type=int, default=2, help="prompts kept queued per server (default 2)")
    srv.add_argument("--job-timeout", type=float, default=1800.0,
                     help="seconds a job may run before it is interrupted and re-queued elsewhere (default 1800)")
    srv.add_argument("--retries", type=int, default=2,
                     help="times a job is re-queued after its server stops answering, per run (default 2)")
    srv.add_argument("--max-attempts", type=int, default=3,
                     help="failed attempts over all runs after which a rerun skips a job (default 3)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bars on stderr: over the images and per node step (default: on when stderr "
                         "is a terminal and not --quiet)")
    args = ap.parse_args(argv)
    show_progress = args.progress if args.progress is not None else (not args.quiet and sys.stderr.isatty())
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")

    from .headless.host import Host, HostMissing
    from .headless.workflow import WorkflowError, ui_to_api

    if not args.workflow.is_file():
        print(f"error: workflow file {args.workflow} does not exist", file=sys.stderr)
        return 2
    try:
        data = json.loads(args.workflow.read_text())
    except json.JSONDecodeError as e:
        print(f"error: {args.workflow} is not valid JSON: {e}", file=sys.stderr)
        return 2
    if args.jobs and not args.server:
        print("error: --jobs needs --server (per-row parameters are a server-mode feature)", file=sys.stderr)
        return 2
    if args.server:
        from .headless.servers import run_batch
        return run_batch(args, data, lambda line: print(line, file=sys.stderr), show_progress, apply_sets,
                         parse_set, IMAGE_SUFFIXES)
    try:
        host = Host.get(args.comfyui, output_dir=args.output_dir, device=args.device)
    except (HostMissing, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        prompt = ui_to_api(data, host.input_types, known_types=set(host.node_classes))
    except WorkflowError as e:
        print(f"error: {args.workflow.name}: {e}", file=sys.stderr)
        return 2

    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if ckpt.is_file():
            host.folder_paths.add_model_folder_path("checkpoints", str(ckpt.resolve().parent))
        for n in prompt.values():
            if n["class_type"] == "CheckpointLoaderSimple":
                n["inputs"]["ckpt_name"] = ckpt.name
    apply_sets(prompt, parse_set(args.set))
    loaders = [nid for nid, n in prompt.items() if n["class_type"] == "LoadImage"]
    savers = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]

    jobs: list[Path | None] = [None]
    if args.input_dir:
        if not args.input_dir.is_dir():
            print(f"error: --input-dir {args.input_dir} is not a folder", file=sys.stderr)
            return 2
        if not loaders:
            print("error: --input-dir given but the workflow has no LoadImage node", file=sys.stderr)
            return 2
        jobs = sorted(p for p in args.input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not jobs:
            print(f"error: no images in {args.input_dir}", file=sys.stderr)
            return 2
        host.set_input_dir(args.input_dir)

    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)     # ComfyUI's own per-sampler tqdm: the node bars below replace it
    progress = Progress(show_progress, images=len(jobs) if args.input_dir else 0)
    host.add_listener(progress.on_event)
    try:
        return _run_jobs(args, host, prompt, jobs, loaders, savers, progress)
    finally:
        host.remove_listener(progress.on_event)
        progress.close()


def _run_jobs(args, host, prompt: dict, jobs: list, loaders: list, savers: list, progress: Progress) -> int:
    from .headless.host import PromptFailed
    done = skipped = 0
    written: list[str] = []
    t0 = time.time()
    for k, image in enumerate(jobs, 1):
        job = json.loads(json.dumps(prompt))
        label = args.workflow.name
        if image is not None:
            label = image.name
            prefix = image.stem
            if any(args.output_dir.glob(f"{prefix}_*.png")):
                skipped += 1
                progress.say(f"[{k}/{len(jobs)}] {image.name}: already done, skipped")
                progress.image_done()
                continue
            try:
                from PIL import Image
                with Image.open(image) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001  (any decoder error means the same thing to the user)
                progress.say(f"error: {image}: not a readable image ({e.__class__.__name__}: {e}); stopping")
                return 1
            for nid in loaders:
                job[nid]["inputs"]["image"] = image.name
            for nid in savers:
                job[nid]["inputs"]["filename_prefix"] = prefix
        progress.start_prompt(job)
        try:
            result = host.run_prompt(job)
        except PromptFailed as e:
            progress.end_prompt()
            progress.say(f"error: {label}: {e}")
            return 1
        progress.end_prompt()
        for node_out in result.ui.values():
            for img in node_out.get("images", []):
                written.append(str(Path(args.output_dir) / img.get("subfolder", "") / img["filename"]))
        done += 1
        progress.say(f"[{k}/{len(jobs)}] {label}: done ({time.time() - t0:.1f}s)")
        progress.image_done()
    progress.close()
    print(f"summary: {done} run, {skipped} skipped, {len(written)} images written to {args.output_dir}")
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
