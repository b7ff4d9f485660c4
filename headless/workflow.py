"""UI-format workflow JSON (what ComfyUI saves and shares) -> API-format prompt (what it executes).

ComfyUI's Python has no such converter; the frontend's `graphToPrompt` does it. This is a port of the
parts a shared workflow uses (shared/design/comfyui-internals.md section 6):

- `widgets_values` map positionally onto a node's widget inputs in schema order (required, then optional);
  an INT seed widget is followed by its `control_after_generate` value, an upload-enabled combo by its
  upload button value; both are skipped;
- links `[id, src_node, src_slot, dst_node, dst_slot, type]` feed socket inputs and widgets turned into inputs;
- frontend-only nodes vanish: Note/MarkdownNote, Reroute (followed to its source), PrimitiveNode (its value
  becomes a constant); muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass an input of the
  requested type straight through (the frontend's rule: the input at the output's index if its type fits,
  else the first input of exactly that type, else the first whose type fits);
- subgraphs (frontend 1.2x+): `definitions.subgraphs` holds each subgraph (its nodes, links, inputs and
  outputs); a node whose `type` is a subgraph's id is an instance of it. Instances are expanded the way the
  frontend's ExecutableNodeDTO does it: an inner node's id in the prompt is "<instance id>:<inner id>"
  (nested: "<outer>:<inner instance>:<node>"); a link from the subgraph's input node (id -10) continues
  at the instance's input of that index in the parent graph; an instance's output continues at the inner
  link into the subgraph's output node (id -20); an unconnected instance input that was promoted to a
  widget on the instance gives its value (the instance's `widgets_values`, aligned with
  `properties.proxyWidgets` when present, else one value per promoted input in input order; missing ->
  the inner widget's own value). Proxy widgets of inner nodes (`proxyWidgets` entries naming an inner
  node) keep their value in that inner node, so nothing more is read for them. Modes are the inner nodes'
  own (the frontend's mute/bypass command writes the instance's mode into every inner node, in the
  definition all its instances share); a bypassed instance passes its inputs through like any bypassed
  node, while an instance muted on its own (inner nodes not) still runs its inner nodes, as in the frontend.
  A node whose type is a subgraph id missing from the definitions raises MissingSubgraph.

The schema source is a function `class_type -> INPUT_TYPES()` dict, so the same code serves the in-process
host (node classes) and the HTTP server (/object_info).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "PrimitiveString", "Label"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODE_MUTED, MODE_BYPASS = 2, 4
SUBGRAPH_INPUT_ID, SUBGRAPH_OUTPUT_ID = -10, -20
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_NO_VALUE = object()


class WorkflowError(ValueError):
    """The workflow cannot be turned into a prompt; the message names the node and the problem."""


class UnknownNodeTypes(WorkflowError):
    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing
        parts = [f"{t} (node {', '.join(ids)})" for t, ids in sorted(missing.items())]
        super().__init__("the workflow uses node types this ComfyUI does not have: " + "; ".join(parts)
                         + ". Install the custom-node pack that provides them, or remove those nodes.")


class MissingSubgraph(WorkflowError):
    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing
        parts = [f"{sid} (node {', '.join(ids)})" for sid, ids in sorted(missing.items())]
        super().__init__("the workflow uses subgraphs whose definitions are not in it: " + "; ".join(parts)
                         + ". A subgraph node's type is the id of an entry in the workflow's "
                         "definitions.subgraphs, and that entry is missing (the file was cut or edited by "
                         "hand); open the original in ComfyUI and save it again, or unpack the subgraph there.")


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
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            table[link[0]] = tuple(link[1:6]) + ((None,) if len(link) < 6 else ())
    return table


def _definitions(workflow: dict) -> dict[str, dict]:
    """Every subgraph definition in the file: the root's definitions.subgraphs and any nested in them."""
    found: dict[str, dict] = {}
    stack = [workflow]
    while stack:
        graph = stack.pop()
        for sg in (graph.get("definitions") or {}).get("subgraphs") or []:
            if isinstance(sg, dict) and isinstance(sg.get("id"), str) and sg["id"] not in found:
                found[sg["id"]] = sg
                stack.append(sg)
    return found


def _type_fits(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection: '*'/'' match anything; comma lists match when any member does."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_type_fits(x, y) for x in a.split(",") for y in b.split(","))


class _Scope:
    """One graph as it is instantiated: the root workflow, or a subgraph definition inside an instance node."""

    def __init__(self, graph: dict, path: tuple[str, ...] = (), instance: dict | None = None,
                 parent: "_Scope | None" = None):
        self.graph, self.path, self.instance, self.parent = graph, path, instance, parent
        self.nodes = {n["id"]: n for n in graph.get("nodes") or []}
        self.links = _links(graph)
        self.inputs = graph.get("inputs") or []
        self.outputs = graph.get("outputs") or []
        self.chain: tuple[str, ...] = (parent.chain if parent else ()) + ((graph["id"],) if instance else ())

    def eid(self, node_id: Any) -> str:
        return ":".join((*self.path, str(node_id)))

    def where(self) -> str:
        if self.instance is None:
            return ""
        return f" inside subgraph '{self.graph.get('name') or self.graph.get('id')}' (node {':'.join(self.path)})"


class _Converter:
    def __init__(self, workflow: dict, schema: SchemaFn, known_types: set[str] | None):
        self.schema, self.known_types = schema, known_types
        self.defs = _definitions(workflow)
        self.root = _Scope(workflow)
        self._children: dict[tuple, _Scope] = {}
        self._widgets: dict[tuple, dict] = {}

    # -- structure ---------------------------------------------------------------------------------------------
    def is_instance(self, node: dict) -> bool:
        return node.get("type") in self.defs

    def child(self, scope: _Scope, node: dict) -> _Scope:
        key = (scope.path, node["id"])
        if key not in self._children:
            sid = node["type"]
            if sid in scope.chain:
                raise WorkflowError(f"node {scope.eid(node['id'])}: subgraph '{self.defs[sid].get('name') or sid}' "
                                    "contains itself")
            self._children[key] = _Scope(self.defs[sid], (*scope.path, str(node["id"])), node, scope)
        return self._children[key]

    def walk(self, scope: _Scope | None = None):
        """(scope, node) for every node that is not a subgraph instance, instances expanded, in id order."""
        scope = scope or self.root
        for nid in sorted(scope.nodes, key=lambda i: (not isinstance(i, int), i if isinstance(i, int) else str(i))):
            node = scope.nodes[nid]
            if self.is_instance(node):
                yield from self.walk(self.child(scope, node))
            else:
                yield scope, node

    def check_types(self) -> None:
        missing: dict[str, list[str]] = {}
        lost: dict[str, list[str]] = {}
        for scope, n in self.walk():
            t = n.get("type")
            if t in FRONTEND_ONLY or n.get("mode") == MODE_MUTED:
                continue
            if isinstance(t, str) and _UUID.match(t) and (self.known_types is None or t not in self.known_types):
                lost.setdefault(t, []).append(scope.eid(n["id"]))
            elif self.known_types is not None and t not in self.known_types:
                missing.setdefault(t, []).append(scope.eid(n["id"]))
        if lost:
            raise MissingSubgraph(lost)
        if missing:
            raise UnknownNodeTypes(missing)

    # -- widget values -----------------------------------------------------------------------------------------
    def input_types(self, scope: _Scope, node: dict) -> dict:
        kind = node.get("type")
        try:
            return self.schema(kind)
        except KeyError:
            if isinstance(kind, str) and _UUID.match(kind):
                raise MissingSubgraph({kind: [scope.eid(node["id"])]}) from None
            raise UnknownNodeTypes({kind: [scope.eid(node["id"])]}) from None

    def widget_values(self, scope: _Scope, node: dict) -> dict[str, Any]:
        """Widget name -> value from the node's widgets_values (positional in schema order, or by name)."""
        key = (scope.path, node["id"])
        if key in self._widgets:
            return self._widgets[key]
        values = node.get("widgets_values")
        out: dict[str, Any] = {}
        if isinstance(values, dict):
            out = dict(values)
        elif values:
            values, pos = list(values), 0
            for name, typ, opts in _ordered_inputs(self.input_types(scope, node)):
                if not _is_widget(typ, opts) or pos >= len(values):
                    continue
                out[name] = values[pos]
                pos += 1
                follows_control = typ == "INT" and (opts.get("control_after_generate")
                                                    or name in ("seed", "noise_seed"))
                follows_upload = any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload"))
                if (follows_control and pos < len(values) and values[pos] in CONTROL_VALUES) or (
                        follows_upload and pos < len(values) and isinstance(values[pos], str)
                        and values[pos] in ("image", "video", "audio")):
                    pos += 1
        self._widgets[key] = out
        return out

    def promoted_value(self, scope: _Scope, index: int) -> Any:
        """Value of the widget that subgraph input `index` shows on the instance node, or _NO_VALUE if none."""

        def widget_target(k: int):  # the first inner widget input the subgraph input feeds (the frontend's pick)
            for lid in scope.inputs[k].get("linkIds") or []:
                link = scope.links.get(lid)
                node = scope.nodes.get(link[2]) if link else None
                for inp in (node or {}).get("inputs") or []:
                    if inp.get("link") == lid and inp.get("widget"):
                        return node, inp
            return None

        target = widget_target(index)
        if target is None:
            return _NO_VALUE
        inst = scope.instance
        values = inst.get("widgets_values")
        value: Any = None
        if isinstance(values, list):
            promoted = [k for k in range(len(scope.inputs)) if k == index or widget_target(k)]
            pos = promoted.index(index)
            if pos < len(values):  # LGraphNode.configure: values onto the promoted widgets in order
                value = values[pos]
            proxies = (inst.get("properties") or {}).get("proxyWidgets")
            if isinstance(proxies, str):
                try:
                    proxies = json.loads(proxies)
                except json.JSONDecodeError:
                    proxies = None
            name = scope.inputs[index].get("name")
            for a, entry in enumerate(proxies if isinstance(proxies, list) else []):
                # then the proxyWidgets order: ["-1", name] is the instance's own (promoted-input) widget
                if (isinstance(entry, (list, tuple)) and len(entry) == 2 and str(entry[0]) == "-1"
                        and entry[1] == name and a < len(values) and values[a] is not None):
                    value = values[a]
        elif isinstance(values, dict):
            value = values.get(scope.inputs[index].get("name"))
        if value is None:  # the promoted widget starts as a copy of the inner widget
            node, inp = target
            widget = (inp.get("widget") or {}).get("name") or inp.get("name")
            value = self.widget_values(scope, node).get(widget)
        return value

    # -- links -------------------------------------------------------------------------------------------------
    def from_link(self, scope: _Scope, link_id: Any, want: Any, seen: frozenset):
        """Resolve what feeds a link: ('link', exec_id, slot), ('value', constant) or None (nothing)."""
        if link_id not in scope.links:
            raise WorkflowError(f"link {link_id}{scope.where()} is referenced by a node but missing from the "
                                "'links' list")
        origin, slot, *_ = scope.links[link_id]
        if origin == SUBGRAPH_INPUT_ID:
            if scope.instance is None:
                raise WorkflowError(f"link {link_id} comes from a subgraph input, but it is in the root graph")
            return self.from_instance_input(scope, slot, want, seen)
        node = scope.nodes.get(origin)
        if node is None:
            raise WorkflowError(f"link {link_id}{scope.where()} comes from node {origin}, which is not in the "
                                "workflow")
        return self.from_output(scope, node, slot, want, seen)

    def from_instance_input(self, scope: _Scope, index: int, want: Any, seen: frozenset):
        """Subgraph input `index` of `scope`: the instance's input in the parent graph, else its widget value."""
        if not 0 <= index < len(scope.inputs):
            raise WorkflowError(f"a link{scope.where()} comes from subgraph input {index}, which the subgraph "
                                "does not have")
        name = scope.inputs[index].get("name")
        entries = [i for i in scope.instance.get("inputs") or [] if i.get("name") == name]
        entry = entries[0] if entries else None
        if entry is not None and entry.get("link") is not None:
            return self.from_link(scope.parent, entry["link"], entry.get("type") or want, seen)
        value = self.promoted_value(scope, index)
        return None if value is _NO_VALUE else ("value", value)

    def from_output(self, scope: _Scope, node: dict, slot: int, want: Any, seen: frozenset):
        key = (scope.path, node["id"], slot)
        if key in seen:
            raise WorkflowError(f"node {scope.eid(node['id'])}: its links form a cycle through "
                                "Reroute/bypassed/subgraph nodes")
        seen = seen | {key}
        kind = node.get("type")
        if kind == "Reroute":
            inp = (node.get("inputs") or [{}])[0]
            return None if inp.get("link") is None else self.from_link(scope, inp["link"], want, seen)
        if kind in ("PrimitiveNode", "PrimitiveString"):
            return ("value", (node.get("widgets_values") or [None])[0])
        if node.get("mode") == MODE_BYPASS:
            inp = self.bypass_input(node, slot, want)
            if inp is None or inp.get("link") is None:
                return None
            return self.from_link(scope, inp["link"], inp.get("type"), seen)
        if self.is_instance(node):
            inner = self.child(scope, node)
            if not 0 <= slot < len(inner.outputs):
                return None
            lids = inner.outputs[slot].get("linkIds") or []
            if not lids:
                return None
            return self.from_link(inner, lids[0], want, seen)
        if node.get("mode") == MODE_MUTED:
            return None
        return ("link", scope.eid(node["id"]), slot)

    @staticmethod
    def bypass_input(node: dict, slot: int, want: Any) -> dict | None:
        """The input a bypassed node passes to output `slot` when a `want`-typed input reads it (frontend rule)."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if want in (None, "", "*"):
            idx = slot if len(inputs) > slot else 0
            return inputs[idx] if idx < len(inputs) else None
        if slot < len(inputs) and _type_fits(inputs[slot].get("type"), out_type) and _type_fits(
                inputs[slot].get("type"), want):
            return inputs[slot]
        for inp in inputs:
            if inp.get("type") == want:
                return inp
        for inp in inputs:
            if _type_fits(inp.get("type"), out_type) and _type_fits(inp.get("type"), want):
                return inp
        return None

    # -- the prompt --------------------------------------------------------------------------------------------
    def node_entry(self, scope: _Scope, n: dict) -> dict:
        eid, kind = scope.eid(n["id"]), n.get("type")
        input_types = self.input_types(scope, n)
        sockets = {i["name"]: i for i in (n.get("inputs") or []) if "name" in i}
        widgets = self.widget_values(scope, n)
        inputs: dict[str, Any] = {}
        for name, typ, opts in _ordered_inputs(input_types):
            widget = _is_widget(typ, opts)
            if widget and name in widgets:
                inputs[name] = widgets[name]
            sock = sockets.get(name)
            if sock is not None and sock.get("link") is not None:
                src = self.from_link(scope, sock["link"], sock.get("type") or typ, frozenset())
                if src is not None:
                    inputs[name] = [src[1], src[2]] if src[0] == "link" else src[1]
                    continue
            required = name in (input_types.get("required") or {})
            if not widget and required and name not in inputs:
                raise WorkflowError(f"node {eid} ({kind}): required input '{name}' is not connected")
            if widget and name not in inputs and required:
                if "default" in opts:
                    inputs[name] = opts["default"]
                else:
                    raise WorkflowError(f"node {eid} ({kind}): no value for widget '{name}'")
        entry = {"class_type": kind, "inputs": inputs}
        if n.get("title"):
            entry["_meta"] = {"title": n["title"]}
        return entry

    def convert(self) -> dict:
        self.check_types()
        prompt: dict[str, dict] = {}
        for scope, n in self.walk():
            if n.get("type") in FRONTEND_ONLY or n.get("mode") in (MODE_MUTED, MODE_BYPASS):
                continue
            prompt[scope.eid(n["id"])] = self.node_entry(scope, n)
        return prompt


def ui_to_api(workflow: dict, schema: SchemaFn, known_types: set[str] | None = None) -> dict:
    """Convert a UI-format workflow into an API-format prompt, checked against the node schemas."""
    if is_api_format(workflow):
        return workflow
    if "nodes" not in workflow:
        raise WorkflowError("not a ComfyUI workflow: no 'nodes' list (and not an API-format prompt either)")
    return _Converter(workflow, schema, known_types).convert()
