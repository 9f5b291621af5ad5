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
    folders = sub("ecodiff_comfy.folders")
    for name in (folders.MASK_FOLDER, folders.PRUNED_FOLDER):
        folder_paths.folder_names_and_paths[name] = ([str(base / name)], {".safetensors"})
        (base / name).mkdir()
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_output_directory(str(base / "output"))
    return base


def _host_module(name: str):
    """A session fixture giving the module ``ecodiff_comfy.<name>`` of the pack under test."""
    @pytest.fixture(scope="session", name=name)
    def fixture():
        return sub(f"ecodiff_comfy.{name}")

    return fixture


folders = _host_module("folders")
weights = _host_module("weights")
sampling = _host_module("sampling")
learning = _host_module("learning")
soft_gates = _host_module("soft_gates")
pruned_models = _host_module("pruned_models")
pruned_files = _host_module("pruned_files")
progress = _host_module("progress")


@pytest.fixture(scope="session")
def core():
    return sub("ecodiff_core")


@pytest.fixture(scope="session")
def nodes():
    return sub("nodes")
