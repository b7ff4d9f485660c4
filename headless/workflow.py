"""UI-format workflow JSON (what ComfyUI saves and shares) -> API-format prompt (what it executes).

ComfyUI's Python has no such converter; the frontend's `graphToPrompt` does it. This is a port of the
parts a shared workflow uses (shared/design/comfyui-internals.md section 6):

- `widgets_values` map positionally onto a node's widget inputs in schema order (required, then optional);
  an INT seed widget is followed by its `control_after_generate` value, an upload-enabled combo by its
  upload button value; both are skipped;
- links `[id, src_node, src_slot, dst_node, dst_slot, type]` feed socket inputs and widgets turned into inputs;
- frontend-only nodes vanish: Note/MarkdownNote, Reroute (followed to its source), PrimitiveNode (its value
  becomes a constant); muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass their first input of
  the same type straight through.

The schema source is a function `class_type -> INPUT_TYPES()` dict, so the same code serves the in-process
host (node classes) and the HTTP server (/object_info).
"""
from __future__ import annotations

from typing import Any, Callable

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "PrimitiveString", "Label"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be turned into a prompt; the message names the node and the problem."""


class UnknownNodeTypes(WorkflowError):
    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing
        parts = [f"{t} (node {', '.join(ids)})" for t, ids in sorted(missing.items())]
        super().__init__("the workflow uses node types this ComfyUI does not have: " + "; ".join(parts)
                         + ". Install the custom-node pack that provides them, or remove those nodes.")


SchemaFn = Callable[[str], dict]


def is_api_format(data: dict) -> bool:
    return isinstance(data, dict) and "nodes" not in data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def _ordered_inputs(input_types: dict) -> list[tuple[str, Any, dict]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            typ = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ: Any, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES


def _links(workflow: dict) -> dict[int, tuple]:
    table = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            table[link[0]] = tuple(link[1:6])
    return table


def ui_to_api(workflow: dict, schema: SchemaFn, known_types: set[str] | None = None) -> dict:
    """Convert a UI-format workflow into an API-format prompt, checked against the node schemas."""
    if is_api_format(workflow):
        return workflow
    if "nodes" not in workflow:
        raise WorkflowError("not a ComfyUI workflow: no 'nodes' list (and not an API-format prompt either)")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("the workflow contains subgraphs; convert them back to nodes (right click > "
                            "Unpack Subgraph) before running it headless")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)

    missing: dict[str, list[str]] = {}
    for n in nodes.values():
        t = n.get("type")
        if t in FRONTEND_ONLY or n.get("mode") in (MODE_MUTED,):
            continue
        if known_types is not None and t not in known_types:
            missing.setdefault(t, []).append(str(n["id"]))
    if missing:
        raise UnknownNodeTypes(missing)

    def source(link_id: int, seen: frozenset = frozenset()):
        """Resolve a link to ('link', node_id, slot) or ('value', constant), through frontend-only nodes."""
        if link_id in seen:
            raise WorkflowError(f"link {link_id} is part of a cycle through Reroute/bypassed nodes")
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is referenced by a node but missing from the 'links' list")
        src, slot, _dst, _dslot, typ = links[link_id]
        node = nodes.get(src)
        if node is None:
            raise WorkflowError(f"link {link_id} comes from node {src}, which is not in the workflow")
        kind = node.get("type")
        if kind == "Reroute":
            inp = (node.get("inputs") or [{}])[0]
            if inp.get("link") is None:
                return None
            return source(inp["link"], seen | {link_id})
        if kind in ("PrimitiveNode", "PrimitiveString"):
            return ("value", (node.get("widgets_values") or [None])[0])
        if node.get("mode") == MODE_BYPASS:
            out_type = typ or ((node.get("outputs") or [{}])[slot].get("type"))
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and (inp.get("type") == out_type or out_type in (None, "*")):
                    return source(inp["link"], seen | {link_id})
            return None
        if node.get("mode") == MODE_MUTED:
            return None
        return ("link", str(src), slot)

    prompt: dict[str, dict] = {}
    for nid, n in sorted(nodes.items(), key=lambda kv: kv[0]):
        kind = n.get("type")
        if kind in FRONTEND_ONLY or n.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        try:
            input_types = schema(kind)
        except KeyError:
            raise UnknownNodeTypes({kind: [str(nid)]}) from None
        socket_links = {i["name"]: i.get("link") for i in (n.get("inputs") or []) if "name" in i}
        values = n.get("widgets_values")
        by_name = values if isinstance(values, dict) else None
        values = [] if values is None or by_name is not None else list(values)
        pos = 0
        inputs: dict[str, Any] = {}
        for name, typ, opts in _ordered_inputs(input_types):
            widget = _is_widget(typ, opts)
            value_present = False
            if widget:
                if by_name is not None:
                    if name in by_name:
                        inputs[name], value_present = by_name[name], True
                elif pos < len(values):
                    inputs[name], value_present = values[pos], True
                    pos += 1
                    follows_control = typ == "INT" and (opts.get("control_after_generate")
                                                        or name in ("seed", "noise_seed"))
                    follows_upload = any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload"))
                    if (follows_control and pos < len(values) and values[pos] in CONTROL_VALUES) or (
                            follows_upload and pos < len(values) and isinstance(values[pos], str)
                            and values[pos] in ("image", "video", "audio")):
                        pos += 1
            link = socket_links.get(name)
            if link is not None:
                src = source(link)
                if src is not None:
                    inputs[name] = [src[1], src[2]] if src[0] == "link" else src[1]
                    continue
            if not widget and name in (input_types.get("required") or {}) and name not in inputs:
                raise WorkflowError(f"node {nid} ({kind}): required input '{name}' is not connected")
            if widget and not value_present and name in (input_types.get("required") or {}):
                if "default" in opts:
                    inputs[name] = opts["default"]
                else:
                    raise WorkflowError(f"node {nid} ({kind}): no value for widget '{name}'")
        entry = {"class_type": kind, "inputs": inputs}
        if n.get("title"):
            entry["_meta"] = {"title": n["title"]}
        prompt[str(nid)] = entry
    return prompt
