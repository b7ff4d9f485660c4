"""Every Z2I node explains itself in the UI (issue 16, "the front door").

The frontend shows a node's description in the node library and its help page, and an input's or output's
tooltip on hover (and, when a help page is missing, in the help panel's tables). So for every node of the pack
(`nodes.NODES`, as the host registered them): a description whose first sentence says in plain words what the
node does for the user, with paper and equation references only after it, and a tooltip on every input,
required or optional (hidden inputs are not shown to users), and on every output. Both the V3 schema and the
server's /object_info entry built from it are checked, on whichever host runs the tests.
"""
from __future__ import annotations

import re
import sys

import pytest

pytestmark = pytest.mark.host

PACK_MODULE = "custom_nodes.z2i"        # the python_module the host gives the pack's nodes (the frontend reads it)
# paper-speak that belongs after the first sentence: equation, section, algorithm, appendix numbers, citations
REFERENCE = re.compile(r"\beqs?\b|\bequation\b|\bsection\b|§|\balg\b|\balgorithm\b|\bapp\.|arxiv|\bet al\b", re.I)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9'\"(])")


def first_sentence(text: str) -> str:
    return SENTENCE_END.split(text.strip(), maxsplit=1)[0]


@pytest.fixture(scope="module")
def z2i_nodes(host) -> dict[str, type]:
    """node id -> class for every node the pack lists in nodes.NODES, as loaded by the host."""
    registered = {k: c for k, c in host.node_classes.items()
                  if getattr(c, "RELATIVE_PYTHON_MODULE", None) == PACK_MODULE}
    assert registered, f"the host registered no node from {PACK_MODULE}"
    any_cls = next(iter(registered.values()))
    package = sys.modules[any_cls.__module__.rsplit(".", 1)[0]]        # .../custom_nodes/z2i.nodes
    listed = {c.GET_SCHEMA().node_id: c for c in package.NODES}
    assert set(listed) == set(registered), "nodes.NODES and the host's registry differ"
    return listed


def test_the_check_sees_every_node(z2i_nodes):
    assert len(z2i_nodes) >= 20 and all(k.startswith("Z2I_") for k in z2i_nodes), sorted(z2i_nodes)


def test_first_sentence_check_catches_paper_speak():
    """The checks below can fail: the old descriptions' openings are caught, plain ones pass."""
    for old in ("DDIM inversion (pix2pix-zero section 3.1, CSG section 3.1): runs the deterministic update.",
                "CSG Eq. 13 as a model patch: in every layer the maps mix.",
                "pix2pix-zero (Parmar et al. 2023, Alg. 1): edits an inverted image.",
                "DDIM (Song et al. 2021, arXiv:2010.02502), written out as the update.",
                "a * coef_a + b * coef_b: directions add up (§5.2)."):
        assert REFERENCE.search(first_sentence(old)), old
    plain = "Finds the noise that recreates your image, so an edit can start from it. Reference: Eq. 3."
    assert first_sentence(plain) == "Finds the noise that recreates your image, so an edit can start from it."
    assert not REFERENCE.search(first_sentence(plain))
    assert first_sentence("Edits it (e.g. cat -> dog) in place. Then Eq. 1.") == "Edits it (e.g. cat -> dog) in place."


def test_descriptions_start_with_what_the_node_does(host, z2i_nodes):
    problems = []
    for node_id, cls in sorted(z2i_nodes.items()):
        for where, text in (("schema", cls.GET_SCHEMA().description), ("object_info",
                                                                         host.node_info(node_id)["description"])):
            if not (text or "").strip():
                problems.append(f"{node_id}: no description ({where})")
                continue
            first = first_sentence(text)
            if REFERENCE.search(first):
                problems.append(f"{node_id}: the first sentence cites the paper ({where}): {first!r}")
    assert not problems, "\n".join(problems)


def test_every_input_has_a_tooltip(host, z2i_nodes):
    problems = []
    for node_id, cls in sorted(z2i_nodes.items()):
        schema = cls.GET_SCHEMA()
        assert schema.inputs, f"{node_id} has no inputs"
        for inp in schema.inputs:
            if not (getattr(inp, "tooltip", None) or "").strip():
                problems.append(f"{node_id}.{inp.id}: no tooltip (schema)")
        info = host.node_info(node_id)["input"]
        shown = {**info.get("required", {}), **info.get("optional", {})}
        assert set(shown) == {i.id for i in schema.inputs}, f"{node_id}: object_info inputs differ from the schema"
        for name, spec in shown.items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not str(opts.get("tooltip") or "").strip():
                problems.append(f"{node_id}.{name}: no tooltip (object_info)")
    assert not problems, "\n".join(problems)


def test_every_output_has_a_tooltip(host, z2i_nodes):
    problems = []
    for node_id, cls in sorted(z2i_nodes.items()):
        schema = cls.GET_SCHEMA()
        for i, out in enumerate(schema.outputs):
            if not (out.tooltip or "").strip():
                problems.append(f"{node_id} output {i} ({out.display_name}): no tooltip (schema)")
        info = host.node_info(node_id)
        tips = info.get("output_tooltips") or []
        if len(info["output"]) != len(schema.outputs) or len(tips) != len(schema.outputs):
            problems.append(f"{node_id}: {len(info['output'])} outputs, {len(tips)} output tooltips (object_info)")
        problems += [f"{node_id} output {i} ({info['output_name'][i]}): no tooltip (object_info)"
                     for i, tip in enumerate(tips) if not (tip or "").strip()]
    assert not problems, "\n".join(problems)
