"""ComfyUI for the tests and scripts of this repository: the one place that finds, prepares and imports it.

- ``comfy_path()``: the checkout named by ``COMFYUI_PATH`` (a folder with ``main.py``), else None;
  ``SKIP_REASON`` says what to set when it is missing.
- ``bootstrap()``: ``import comfy`` works in this process, on CPU: the checkout first on ``sys.path``,
  torchvision's missing C operators declared (``ecodiff_core/_compat.py``), ``--cpu``.
- ``comfy_nodes()``: ComfyUI's ``nodes`` module, checked not to be shadowed.
- ``load_pack()`` / ``sub(name)``: this repository imported as ComfyUI imports a custom node pack (a
  package named after its folder, relative imports), under the name ``PACK``.
- ``python scripts/comfy_env.py ARGS``: ``python $COMFYUI_PATH/main.py ARGS`` with the same torchvision
  workaround (the server tests start ComfyUI this way).

Used by pytest (``from scripts.comfy_env import ...``), by ``tests/comfy_tiny.py`` (which also works when
loaded alone from its file) and by ``scripts/make_example_workflows.py``.  Standard library and torch only;
nothing of ComfyUI or of this repository is imported at module level, and the repository root is never put
on ``sys.path`` (its ``nodes/`` package would shadow ComfyUI's ``nodes.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PACK = "ecodiff_pack_under_test"
SKIP_REASON = ("COMFYUI_PATH is not set (or is not a ComfyUI checkout with main.py): these tests need ComfyUI, "
               "e.g. COMFYUI_PATH=/path/to/ComfyUI pytest tests")


def comfy_path() -> str | None:
    """Absolute path of the ComfyUI checkout in ``COMFYUI_PATH``, or None when unset or without ``main.py``."""
    path = os.environ.get("COMFYUI_PATH")
    return os.path.abspath(path) if path and os.path.isfile(os.path.join(path, "main.py")) else None


def import_file(name: str, path: Path | str) -> ModuleType:
    """The module ``name`` executed from ``path`` (once: ``sys.modules`` keeps it), without touching ``sys.path``."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def prepare_import() -> str:
    """Put the checkout first on ``sys.path`` and make ``import torchvision`` work; the checkout's path.

    Raises RuntimeError with ``SKIP_REASON`` when there is no checkout."""
    path = comfy_path()
    if path is None:
        raise RuntimeError(SKIP_REASON)
    if path not in sys.path:
        sys.path.insert(0, path)
    # the engine's guard, from its file: the repository root is not on sys.path everywhere this runs
    import_file("ecodiff_env_compat", ROOT / "ecodiff_core" / "_compat.py").ensure_torchvision_importable()
    return path


def bootstrap() -> None:
    """Make ``import comfy`` work in this process, on CPU; idempotent.  RuntimeError without a checkout."""
    prepare_import()
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (must come after args.cpu)


def comfy_nodes() -> ModuleType:
    """ComfyUI's ``nodes.py`` module, after ``bootstrap()``; RuntimeError when another ``nodes`` (such as this
    pack's ``nodes/`` package) shadows it on ``sys.path``."""
    bootstrap()
    import nodes

    root = os.path.realpath(comfy_path())
    if not os.path.realpath(getattr(nodes, "__file__", "")).startswith(root + os.sep):
        raise RuntimeError(f"'nodes' resolves to {getattr(nodes, '__file__', None)}, not ComfyUI's nodes.py "
                           f"(something put a bare 'nodes' ahead of {root} on sys.path)")
    return nodes


def load_pack() -> ModuleType:
    """This repository imported as ComfyUI imports it (package ``PACK``, relative imports), after ``bootstrap()``."""
    if PACK not in sys.modules:
        bootstrap()
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def sub(name: str) -> ModuleType:
    """The pack's module ``name`` (e.g. ``"nodes"``, ``"ecodiff_core.maskfile"``), imported through ``load_pack()``."""
    load_pack()
    return importlib.import_module(f"{PACK}.{name}")


def run_comfyui(argv: list[str]) -> None:
    """``python $COMFYUI_PATH/main.py ARGV`` in this process, with torchvision's operators declared first
    (on a healthy install that does nothing)."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # as `python main.py` has it
    try:
        root = prepare_import()
    except RuntimeError as exc:
        sys.exit(str(exc))
    main_py = os.path.join(root, "main.py")
    sys.argv = [main_py, *argv]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    run_comfyui(sys.argv[1:])
