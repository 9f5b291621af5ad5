"""ComfyUI workflow files and node schemas: reading both, and the schemas of the installed nodes.

A *UI-format* workflow is what the ComfyUI frontend saves (``version`` 0.4): ``nodes`` with ``id``,
``type``, ``pos``, ``size``, ``inputs`` (sockets; in frontend >= 1.16 every widget also has an input
with ``widget: {name}``), ``outputs`` (with ``links``) and ``widgets_values`` (one value per widget in
schema order, plus the ``control_after_generate`` value after every input that has one); and
``links`` as ``[id, origin_id, origin_slot, target_id, target_slot, type]``.

*Schemas* are given in the shape of ComfyUI's ``GET /object_info`` (``{type: {"input": {...},
"input_order": {...}, "output": [...], "output_name": [...]}}``), from a running server or built
in-process by ``object_info_in_process()`` (needs ``COMFYUI_PATH``).

Checks are in ``scripts/workflow_check.py``, building in ``scripts/workflow_graph.py``, UI -> API
conversion (tests only) in ``tests/workflow_api.py``.  Imports nothing from ComfyUI at module level.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
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
    return list(zip(names, types, strict=True))


def types_compatible(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    outs, ins = set(str(out_type).split(",")), set(str(in_type).split(","))
    return bool(outs & ins)


# ------------------------------------------------------------------------------------------------
# workflow files
# ------------------------------------------------------------------------------------------------
def example_paths() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


def load(path: Path | str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def nodes_by_id(wf: dict) -> dict[int, dict]:
    return {n["id"]: n for n in wf.get("nodes", [])}


def links_by_id(wf: dict) -> dict[int, list]:
    return {link[0]: link for link in wf.get("links", [])}


def notes(wf: dict) -> list[dict]:
    return [n for n in wf.get("nodes", []) if n.get("type") in NOTE_TYPES]


# ------------------------------------------------------------------------------------------------
# schemas built in-process (no server)
# ------------------------------------------------------------------------------------------------
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

    from scripts import comfy_env

    comfy_env.bootstrap()
    comfy_root = os.path.realpath(comfy_env.comfy_path())
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

    comfy_nodes = comfy_env.comfy_nodes()
    if not getattr(comfy_nodes, "_ecodiff_tests_extras_loaded", False):
        asyncio.run(comfy_nodes.init_builtin_extra_nodes())
        comfy_nodes._ecodiff_tests_extras_loaded = True
    pack = comfy_env.load_pack()

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
