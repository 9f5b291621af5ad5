"""Checks of UI-format workflow files: structure (ids, links, sockets agree) and values against node
schemas (``scripts/workflow_schema.py``), and the EcoDiff inputs that ``docs/nodes.md`` documents.

Used by ``scripts/make_example_workflows.py`` before it writes a file, and by the tests of the example
workflows (unit, server and browser tiers).
"""
from __future__ import annotations

import math
from typing import Any

from scripts.workflow_schema import (
    CONTROL_VALUES,
    FILE_COMBOS,
    FRONTEND_ONLY,
    ROOT,
    InputSpec,
    links_by_id,
    nodes_by_id,
    schema_inputs,
    schema_outputs,
    types_compatible,
    widget_slots,
)


def check_structure(wf: dict) -> list[str]:
    """Problems that need no schema: format, ids, and that links, inputs and outputs agree."""
    problems: list[str] = []
    if wf.get("version") != 0.4:
        problems.append(f"version is {wf.get('version')!r}, expected 0.4 (the frontend's workflow format)")
    for key, kind in (("nodes", list), ("links", list)):
        if not isinstance(wf.get(key), kind):
            problems.append(f"'{key}' must be a {kind.__name__}")
    if problems:
        return problems
    nodes = wf["nodes"]
    ids = [n.get("id") for n in nodes]
    if len(ids) != len(set(ids)):
        problems.append(f"duplicate node ids: {sorted(i for i in ids if ids.count(i) > 1)}")
    for n in nodes:
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "mode", "order", "flags", "properties"):
            if key not in n:
                problems.append(f"node {n.get('id')} ({n.get('type')}) has no '{key}'")
        if n.get("mode", 0) not in (0, 2, 4):
            problems.append(f"node {n.get('id')}: unknown mode {n.get('mode')}")
    if ids and isinstance(wf.get("last_node_id"), int) and wf["last_node_id"] < max(ids):
        problems.append(f"last_node_id {wf['last_node_id']} < largest node id {max(ids)}")
    by_id = nodes_by_id(wf)
    link_ids = [link[0] for link in wf["links"]]
    if len(link_ids) != len(set(link_ids)):
        problems.append("duplicate link ids")
    if link_ids and isinstance(wf.get("last_link_id"), int) and wf["last_link_id"] < max(link_ids):
        problems.append(f"last_link_id {wf['last_link_id']} < largest link id {max(link_ids)}")
    for link in wf["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            problems.append(f"link {link!r} is not [id, origin_id, origin_slot, target_id, target_slot, type]")
            continue
        lid, oid, oslot, tid, tslot, ltype = link
        src, dst = by_id.get(oid), by_id.get(tid)
        if src is None or dst is None:
            problems.append(f"link {lid}: node {oid if src is None else tid} does not exist")
            continue
        outs, ins = src.get("outputs") or [], dst.get("inputs") or []
        if not 0 <= oslot < len(outs):
            problems.append(f"link {lid}: {src['type']} #{oid} has no output slot {oslot}")
        else:
            if lid not in (outs[oslot].get("links") or []):
                problems.append(f"link {lid}: not listed in {src['type']} #{oid} output '{outs[oslot].get('name')}'")
            if outs[oslot].get("type") != ltype:
                problems.append(f"link {lid}: type {ltype} but output '{outs[oslot].get('name')}' is "
                                f"{outs[oslot].get('type')}")
        if not 0 <= tslot < len(ins):
            problems.append(f"link {lid}: {dst['type']} #{tid} has no input slot {tslot}")
        else:
            if ins[tslot].get("link") != lid:
                problems.append(f"link {lid}: {dst['type']} #{tid} input '{ins[tslot].get('name')}' has link "
                                f"{ins[tslot].get('link')}")
            if not types_compatible(ltype, ins[tslot].get("type", "*")):
                problems.append(f"link {lid}: {ltype} into {dst['type']} #{tid} input '{ins[tslot].get('name')}' "
                                f"of type {ins[tslot].get('type')}")
    links = links_by_id(wf)
    for n in nodes:
        names = [i.get("name") for i in n.get("inputs") or []]
        if len(names) != len(set(names)):
            problems.append(f"node {n['id']} ({n['type']}): duplicate input names")
        for slot, inp in enumerate(n.get("inputs") or []):
            lid = inp.get("link")
            if lid is not None and (lid not in links or links[lid][3] != n["id"] or links[lid][4] != slot):
                problems.append(f"node {n['id']} ({n['type']}) input '{inp.get('name')}' points at link {lid}, "
                                f"which does not end there")
        for slot, out in enumerate(n.get("outputs") or []):
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1] != n["id"] or links[lid][2] != slot:
                    problems.append(f"node {n['id']} ({n['type']}) output '{out.get('name')}' lists link {lid}, "
                                    f"which does not start there")
    return problems


def documented_inputs() -> dict[str, list[str]]:
    """Input names per EcoDiff node id, from the table in docs/nodes.md."""
    import re

    out = {}
    for line in (ROOT / "docs" / "nodes.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and re.fullmatch(r"`EcoDiff\w+`", cells[1]):
            out[cells[1].strip("`")] = re.findall(r"`(\w+)` [A-Z_]+", cells[3])
    return out


def _check_value(node: dict, spec: InputSpec, value: Any) -> str | None:
    where = f"node {node['id']} ({node['type']}) widget '{spec.name}'"
    opts = spec.options
    if spec.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{where}: {value!r} is not an integer"
    elif spec.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{where}: {value!r} is not a number"
    elif spec.type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{where}: {value!r} is not a boolean"
    elif spec.type == "STRING":
        if not isinstance(value, str):
            return f"{where}: {value!r} is not a string"
    elif spec.type == "COMBO":
        choices = spec.combo_options or []
        if spec.name in FILE_COMBOS:
            if not isinstance(value, str) or not value:
                return f"{where}: {value!r} is not a file name"
        elif value not in choices:
            return f"{where}: {value!r} is not one of {choices}"
    if spec.type in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            return f"{where}: {value} < min {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{where}: {value} > max {opts['max']}"
    return None


def check_against_schemas(wf: dict, object_info: dict) -> list[str]:
    """Problems with node types, input/output names and types, and widget values (count, order, type,
    range, combo choices) against ``object_info``."""
    problems: list[str] = []
    links = links_by_id(wf)
    for n in wf.get("nodes", []):
        kind = n.get("type")
        if kind in FRONTEND_ONLY:
            continue
        info = object_info.get(kind)
        if info is None:
            problems.append(f"node {n['id']}: type '{kind}' is not a known node type")
            continue
        specs = {s.name: s for s in schema_inputs(info)}
        for inp in n.get("inputs") or []:
            spec = specs.get(inp.get("name"))
            if spec is None:
                problems.append(f"node {n['id']} ({kind}): input '{inp.get('name')}' is not in the schema "
                                f"(known: {sorted(specs)})")
                continue
            if not types_compatible(spec.type, inp.get("type", "*")):
                problems.append(f"node {n['id']} ({kind}): input '{spec.name}' has type {inp.get('type')}, "
                                f"schema says {spec.type}")
            if spec.is_widget and (inp.get("widget") or {}).get("name") != spec.name:
                problems.append(f"node {n['id']} ({kind}): widget input '{spec.name}' lacks widget.name")
            if not spec.is_widget and inp.get("widget"):
                problems.append(f"node {n['id']} ({kind}): input '{spec.name}' is a socket, not a widget")
        present = {i.get("name"): i for i in n.get("inputs") or []}
        for spec in specs.values():
            linked = present.get(spec.name, {}).get("link") is not None
            if not spec.optional and not spec.is_widget and not linked:
                problems.append(f"node {n['id']} ({kind}): required input '{spec.name}' is not connected")
            if not spec.is_widget and spec.name not in present:
                problems.append(f"node {n['id']} ({kind}): input socket '{spec.name}' is missing")
        outs = schema_outputs(info)
        node_outs = n.get("outputs") or []
        if len(node_outs) != len(outs):
            problems.append(f"node {n['id']} ({kind}): {len(node_outs)} outputs, schema has {len(outs)}")
        for slot, (out, (name, otype)) in enumerate(zip(node_outs, outs, strict=False)):
            if out.get("name") != name or out.get("type") != otype:
                problems.append(f"node {n['id']} ({kind}) output {slot}: {out.get('name')}:{out.get('type')}, "
                                f"schema says {name}:{otype}")
        slots = widget_slots(info)
        values = n.get("widgets_values")
        if not slots:
            if values not in (None, []):
                problems.append(f"node {n['id']} ({kind}): has widgets_values but the node has no widgets")
            continue
        if not isinstance(values, list) or len(values) != len(slots):
            problems.append(f"node {n['id']} ({kind}): {len(values) if isinstance(values, list) else values!r} "
                            f"widget values, schema needs {len(slots)} "
                            f"({[s.name + ('/control' if k == 'control' else '') for k, s in slots]})")
            continue
        for (slot_kind, spec), value in zip(slots, values, strict=True):
            if slot_kind == "control":
                if value not in CONTROL_VALUES:
                    problems.append(f"node {n['id']} ({kind}): control_after_generate of '{spec.name}' is "
                                    f"{value!r}, not one of {CONTROL_VALUES}")
                continue
            if present.get(spec.name, {}).get("link") is not None and spec.name in present:
                lid = present[spec.name]["link"]
                if lid not in links:
                    problems.append(f"node {n['id']} ({kind}): widget input '{spec.name}' has a dangling link")
            problem = _check_value(n, spec, value)
            if problem:
                problems.append(problem)
    return problems
