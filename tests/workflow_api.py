"""UI-format workflow -> the API-format prompt the ComfyUI frontend queues (``POST /prompt``), for the
server and browser tests and the example-workflow test; schemas as in ``scripts/workflow_schema.py``."""
from __future__ import annotations

from typing import Any

from scripts.workflow_schema import FRONTEND_ONLY, links_by_id, nodes_by_id, widget_slots


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    values = node.get("widgets_values") or []
    out = {}
    for (slot_kind, spec), value in zip(widget_slots(info), values, strict=False):
        if slot_kind == "value":
            out[spec.name] = value
    return out


def to_api(wf: dict, object_info: dict) -> dict[str, dict]:
    """The API-format prompt the frontend would queue for ``wf`` (muted and frontend-only nodes
    dropped; bypassed nodes are not supported here)."""
    nodes = nodes_by_id(wf)
    links = links_by_id(wf)
    prompt: dict[str, dict] = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) == 2:
            continue
        if n.get("mode", 0) == 4:
            raise ValueError(f"node {n['id']} ({n['type']}) is bypassed; to_api does not handle bypass")
        info = object_info[n["type"]]
        inputs: dict[str, Any] = dict(widget_values(n, info))
        for inp in n.get("inputs") or []:
            lid = inp.get("link")
            if lid is None:
                continue
            _, oid, oslot, *_ = links[lid]
            if nodes[oid]["type"] in FRONTEND_ONLY:
                raise ValueError(f"link {lid} starts at a frontend-only node ({nodes[oid]['type']})")
            inputs[inp["name"]] = [str(oid), oslot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                                "_meta": {"title": n.get("title") or n["type"]}}
    return prompt
