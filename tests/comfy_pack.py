"""Import this repository as ComfyUI does (a package named after its folder, relative imports)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import comfy_tiny

ROOT = Path(__file__).resolve().parent.parent
PACK = "ecodiff_pack_under_test"


def load_pack():
    """Import the repository as ComfyUI does: a package named after its folder, relative imports."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    comfy_tiny.bootstrap()
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def sub(name: str):
    load_pack()
    return importlib.import_module(f"{PACK}.{name}")
