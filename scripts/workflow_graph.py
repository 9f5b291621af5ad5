"""Building UI-format workflows exactly as ComfyUI frontend 1.27 serialises them, from node schemas
(``scripts/workflow_schema.py``); used by ``scripts/make_example_workflows.py``."""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from scripts.workflow_schema import (
    OPTIONAL_SHAPE,
    InputSpec,
    schema_inputs,
    schema_outputs,
    types_compatible,
    widget_slots,
)


@dataclass
class Node:
    id: int
    type: str
    data: dict
    info: dict | None


@dataclass
class WorkflowBuilder:
    """Builds a UI-format workflow exactly as frontend 1.27 serialises one, from schemas."""

    object_info: dict
    nodes: list[Node] = field(default_factory=list)
    links: list[list] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)

    def add(self, kind: str, pos: tuple[float, float], widgets: dict[str, Any] | None = None,
            size: tuple[float, float] | None = None, title: str | None = None, controls: str = "fixed",
            color: str | None = None, bgcolor: str | None = None) -> Node:
        info = self.object_info[kind]
        widgets = dict(widgets or {})
        specs = schema_inputs(info)
        unknown = set(widgets) - {s.name for s in specs if s.is_widget}
        if unknown:
            raise KeyError(f"{kind} has no widgets {sorted(unknown)}")
        inputs = []
        for spec in specs:  # sockets first, then widget inputs (as the frontend creates them)
            if not spec.is_widget:
                inputs.append(self._input(spec))
        for spec in specs:
            if spec.is_widget:
                inputs.append(self._input(spec))
        values = []
        for slot_kind, spec in widget_slots(info):
            if slot_kind == "control":
                values.append(controls)
            elif spec.name in widgets:
                values.append(widgets[spec.name])
            elif "default" in spec.options:
                values.append(spec.options["default"])
            elif spec.type == "COMBO" and spec.combo_options:
                values.append(spec.combo_options[0])
            else:
                raise KeyError(f"{kind}.{spec.name}: no value and no default")
        outputs = [{"localized_name": name, "name": name, "type": otype, "links": []}
                   for name, otype in schema_outputs(info)]
        node_id = len(self.nodes) + 1
        data = {"id": node_id, "type": kind, "pos": [float(pos[0]), float(pos[1])],
                "size": [float(s) for s in (size or (315, 26 + 24 * max(len(values), len(outputs), 1)))],
                "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": kind}}
        if title:
            data["title"] = title
        data["widgets_values"] = values  # the frontend saves [] for nodes without widgets
        if color:
            data["color"] = color
        if bgcolor:
            data["bgcolor"] = bgcolor
        node = Node(node_id, kind, data, info)
        self.nodes.append(node)
        return node

    @staticmethod
    def _input(spec: InputSpec) -> dict:
        inp: dict[str, Any] = {"localized_name": spec.name, "name": spec.name}
        if spec.optional:
            inp["shape"] = OPTIONAL_SHAPE
        inp["type"] = spec.type
        if spec.is_widget:
            inp["widget"] = {"name": spec.name}
        inp["link"] = None
        return inp

    def note(self, text: str, pos: tuple[float, float], size: tuple[float, float] = (420, 260),
             markdown: bool = True, title: str | None = None) -> Node:
        kind = "MarkdownNote" if markdown else "Note"
        node_id = len(self.nodes) + 1
        data = {"id": node_id, "type": kind, "pos": [float(pos[0]), float(pos[1])],
                "size": [float(size[0]), float(size[1])], "flags": {}, "order": 0, "mode": 0,
                "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                "color": "#432", "bgcolor": "#653"}
        if title:
            data["title"] = title
        node = Node(node_id, kind, data, None)
        self.nodes.append(node)
        return node

    def connect(self, src: Node, output: str | int, dst: Node, input_name: str) -> int:
        outs = src.data["outputs"]
        slot = output if isinstance(output, int) else next(
            (i for i, o in enumerate(outs) if o["name"] == output), None)
        if slot is None or not 0 <= slot < len(outs):
            raise KeyError(f"{src.type} has no output {output!r} ({[o['name'] for o in outs]})")
        tslot = next((i for i, inp in enumerate(dst.data["inputs"]) if inp["name"] == input_name), None)
        if tslot is None:
            raise KeyError(f"{dst.type} has no input {input_name!r}")
        if dst.data["inputs"][tslot]["link"] is not None:
            raise ValueError(f"{dst.type}.{input_name} is already connected")
        otype = outs[slot]["type"]
        if not types_compatible(otype, dst.data["inputs"][tslot]["type"]):
            raise TypeError(f"{src.type}.{outs[slot]['name']} ({otype}) -> {dst.type}.{input_name} "
                            f"({dst.data['inputs'][tslot]['type']})")
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, slot, dst.id, tslot, otype])
        outs[slot]["links"].append(link_id)
        dst.data["inputs"][tslot]["link"] = link_id
        return link_id

    def group(self, title: str, bounding: tuple[float, float, float, float], color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [float(b) for b in bounding],
                            "color": color, "font_size": 24, "flags": {}})

    def to_json(self, workflow_id: str | None = None) -> dict:
        order = _execution_order(self.nodes, self.links)
        nodes = []
        for node in self.nodes:
            data = dict(node.data)
            data["order"] = order[node.id]
            data["outputs"] = [dict(o, links=o["links"] or None) for o in data["outputs"]]
            nodes.append(data)
        return {"id": workflow_id or str(uuid.uuid4()), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": nodes, "links": [list(link) for link in self.links], "groups": self.groups,
                "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": "1.27.10"},
                "version": 0.4}


def _execution_order(nodes: Iterable[Node], links: list[list]) -> dict[int, int]:
    """Topological order (ties by id), as the frontend stores in each node's ``order``."""
    nodes = list(nodes)
    deps = {n.id: set() for n in nodes}
    for _, oid, _, tid, _, _ in links:
        deps[tid].add(oid)
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise ValueError("the workflow has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order
