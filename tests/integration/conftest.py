"""Integration tests on tiny real ComfyUI models; skipped unless COMFYUI_PATH points at ComfyUI."""
from __future__ import annotations

import pytest

from scripts.comfy_env import SKIP_REASON, comfy_path, load_pack, sub


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session", autouse=True)
def comfy_dirs(tmp_path_factory):
    """Model, temp and output folders of this test session (never the user's)."""
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
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


@pytest.fixture(scope="session")
def nodes():
    return sub("nodes")
