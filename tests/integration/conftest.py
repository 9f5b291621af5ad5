"""Integration tests on tiny real ComfyUI models; skipped unless COMFYUI_PATH points at ComfyUI."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import comfy_tiny  # noqa: E402

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


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session", autouse=True)
def comfy_dirs(tmp_path_factory):
    """Model, temp and output folders of this test session (never the user's)."""
    if comfy_tiny.comfy_path() is None:
        pytest.skip(comfy_tiny.COMFY_SKIP_REASON)
    load_pack()
    import folder_paths

    base = tmp_path_factory.mktemp("comfy")
    bridge = sub("ecodiff_comfy.bridge")
    for name in (bridge.MASK_FOLDER, bridge.PRUNED_FOLDER):
        folder_paths.folder_names_and_paths[name] = ([str(base / name)], {".safetensors"})
        (base / name).mkdir()
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_output_directory(str(base / "output"))
    return base


@pytest.fixture(scope="session")
def bridge():
    return sub("ecodiff_comfy.bridge")


@pytest.fixture(scope="session")
def core():
    return sub("ecodiff_core")
