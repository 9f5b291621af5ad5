"""ComfyUI workflow files: structure checks, validation against node schemas, UI -> API conversion.

A *UI-format* workflow is what the ComfyUI frontend saves (``version`` 0.4): ``nodes`` with ``id``,
``type``, ``pos``, ``size``, ``inputs`` (sockets; in frontend >= 1.16 every widget also has an input
with ``widget: {name}``), ``outputs`` (with ``links``) and ``widgets_values`` (one value per widget in
schema order, plus the ``control_after_generate`` value after every input that has one); and
``links`` as ``[id, origin_id, origin_slot, target_id, target_slot, type]``.

*Schemas* are given in the shape of ComfyUI's ``GET /object_info`` (``{type: {"input": {...},
"input_order": {...}, "output": [...], "output_name": [...]}}``), from a running server or built
in-process by ``object_info_in_process()`` (needs ``COMFYUI_PATH``).

Used by the unit test (``tests/unit/test_example_workflows.py``), the server test and the browser test,
and by ``scripts/make_example_workflows.py``.  Imports nothing from ComfyUI at module level.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EXAMPLES = ROOT / "example_workflows"

#: node types the frontend adds by itself (never in /object_info, never sent to the server)
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
NOTE_TYPES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
#: combo inputs whose options are the user's files: any name is valid in a shipped workflow
FILE_COMBOS = {"ckpt_name", "unet_name", "vae_name", "clip_name", "clip_name1", "clip_name2", "clip_name3",
               "mask_name", "model_name", "lora_name", "control_net_name", "style_model_name"}
OPTIONAL_SHAPE = 7  # RenderShape.HollowCircle: how the frontend marks optional sockets


# ------------------------------------------------------------------------------------------------
# schemas
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str
    options: dict
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control(self) -> bool:
        """The frontend adds a 'control after generate' combo (saved in widgets_values) after it: when the
        input says control_after_generate, and for INT inputs named seed/noise_seed unless it says False."""
        if not self.is_widget:
            return False
        flag = self.options.get("control_after_generate")
        if flag is None:
            return self.type == "INT" and self.name in ("seed", "noise_seed")
        return bool(flag)

    @property
    def combo_options(self) -> list | None:
        return self.options.get("options") if self.type == "COMBO" else None


def _spec_type(raw: Any) -> tuple[str, dict]:
    kind = raw[0] if raw else None
    opts = dict(raw[1]) if len(raw) > 1 and isinstance(raw[1], dict) else {}
    if isinstance(kind, list):  # V1 combo: the option list itself
        opts.setdefault("options", kind)
        return "COMBO", opts
    return str(kind), opts


def schema_inputs(info: dict) -> list[InputSpec]:
    """Inputs in the order the frontend creates them (``input_order``: required, then optional)."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {k: list(v) for k, v in inputs.items()}
    out = []
    for section in ("required", "optional"):
        defined = inputs.get(section) or {}
        names = [n for n in order.get(section, []) if n in defined] + \
                [n for n in defined if n not in order.get(section, [])]
        for name in names:
            kind, opts = _spec_type(defined[name])
            out.append(InputSpec(name, kind, opts, section == "optional"))
    return out


def widget_slots(info: dict) -> list[tuple[str, InputSpec]]:
    """What ``widgets_values`` holds, in order: ("value", spec) per widget, ("control", spec) after
    every widget with control_after_generate."""
    slots = []
    for spec in schema_inputs(info):
        if spec.is_widget:
            slots.append(("value", spec))
            if spec.has_control:
                slots.append(("control", spec))
    return slots


def schema_outputs(info: dict) -> list[tuple[str, str]]:
    types = [t if not isinstance(t, list) else "COMBO" for t in info.get("output", [])]
    names = list(info.get("output_name") or types)
    return list(zip(names, types))


def types_compatible(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    outs, ins = set(str(out_type).split(",")), set(str(in_type).split(","))
    return bool(outs & ins)


# ------------------------------------------------------------------------------------------------
# loading and structure
# ------------------------------------------------------------------------------------------------
def example_paths() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


def load(path: Path | str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def nodes_by_id(wf: dict) -> dict[int, dict]:
    return {n["id"]: n for n in wf.get("nodes", [])}


def links_by_id(wf: dict) -> dict[int, list]:
    return {link[0]: link for link in wf.get("links", [])}


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


def notes(wf: dict) -> list[dict]:
    return [n for n in wf.get("nodes", []) if n.get("type") in NOTE_TYPES]


# ------------------------------------------------------------------------------------------------
# validation against schemas
# ------------------------------------------------------------------------------------------------
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
        for slot, inp in enumerate(n.get("inputs") or []):
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
        for slot, (out, (name, otype)) in enumerate(zip(node_outs, outs)):
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
        for (slot_kind, spec), value in zip(slots, values):
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


# ------------------------------------------------------------------------------------------------
# UI -> API
# ------------------------------------------------------------------------------------------------
def widget_values(node: dict, info: dict) -> dict[str, Any]:
    values = node.get("widgets_values") or []
    out = {}
    for (slot_kind, spec), value in zip(widget_slots(info), values):
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


# ------------------------------------------------------------------------------------------------
# building UI workflows (scripts/make_example_workflows.py)
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# schemas built in-process (no server)
# ------------------------------------------------------------------------------------------------
PACK_MODULE = "ecodiff_pack_under_test"  # same name as tests/integration/conftest.py uses


def comfy_path_or_none() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    return path if path and os.path.isfile(os.path.join(path, "main.py")) else None


def node_info(cls: type, name: str) -> dict:
    """``GET /object_info`` entry of one node class (as ComfyUI 0.3.64's server.node_info builds it)."""
    try:
        from comfy_api.internal import _ComfyNodeInternal
    except ImportError:  # older ComfyUI: no V3
        _ComfyNodeInternal = ()
    if _ComfyNodeInternal and issubclass(cls, _ComfyNodeInternal):
        info = cls.GET_NODE_INFO_V1()
    else:
        types = cls.INPUT_TYPES()
        info = {"input": types, "input_order": {k: list(v) for k, v in types.items()},
                "output": list(cls.RETURN_TYPES),
                "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
                "name": name, "category": getattr(cls, "CATEGORY", "sd")}
    return json.loads(json.dumps(info, default=str))


def object_info_in_process() -> dict:
    """Schemas of ComfyUI's built-in nodes (nodes.py + comfy_extras) and of this pack, loaded in this
    process from ``$COMFYUI_PATH``; ComfyUI's own ``nodes`` module must not be shadowed."""
    import asyncio
    import importlib.util
    import sys

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import comfy_tiny

    comfy_tiny.bootstrap()
    comfy_root = os.path.realpath(comfy_tiny.comfy_path())
    # main.py imports ComfyUI's top-level 'utils' package before nodes.py puts comfy/ (with its
    # utils.py) first on sys.path; server.py, imported by some comfy_extras, needs the package.
    loaded = sys.modules.get("utils")
    if loaded is None or not hasattr(loaded, "__path__"):  # absent, or comfy/utils.py under that name
        package_dir = os.path.join(comfy_root, "utils")
        spec = importlib.util.spec_from_file_location("utils", os.path.join(package_dir, "__init__.py"),
                                                      submodule_search_locations=[package_dir])
        package = importlib.util.module_from_spec(spec)
        sys.modules["utils"] = package
        spec.loader.exec_module(package)
    import utils.install_util  # noqa: F401

    import nodes as comfy_nodes

    if not os.path.realpath(getattr(comfy_nodes, "__file__", "")).startswith(comfy_root + os.sep):
        raise RuntimeError(f"'nodes' resolves to {getattr(comfy_nodes, '__file__', None)}, not ComfyUI's nodes.py "
                           f"(something put a bare 'nodes' ahead of {comfy_root} on sys.path)")
    if not getattr(comfy_nodes, "_ecodiff_tests_extras_loaded", False):
        asyncio.run(comfy_nodes.init_builtin_extra_nodes())
        comfy_nodes._ecodiff_tests_extras_loaded = True
    pack = sys.modules.get(PACK_MODULE)
    if pack is None:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = pack
        spec.loader.exec_module(pack)

    async def pack_nodes():
        extension = await pack.comfy_entrypoint()
        return await extension.get_node_list()

    info = {}
    for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items():
        try:
            info[name] = node_info(cls, name)
        except Exception:  # noqa: BLE001, S112 - a broken built-in node is not this pack's problem
            continue
    for cls in asyncio.run(pack_nodes()):
        node_id = cls.GET_SCHEMA().node_id
        info[node_id] = node_info(cls, node_id)
    return info
