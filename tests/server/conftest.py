"""Server end-to-end tests: a real ComfyUI (``$COMFYUI_PATH/main.py --cpu``) on 127.0.0.1 with this pack and
the test-only tiny-models pack; skipped unless COMFYUI_PATH points at a ComfyUI checkout."""
from __future__ import annotations

import pytest

import comfy_server
from scripts.comfy_env import SKIP_REASON, comfy_path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
    try:
        import aiohttp  # noqa: F401  (ComfyUI's requirements bring it; the websocket client uses it)
    except ImportError:
        pytest.skip("aiohttp is not installed (it comes with ComfyUI's requirements)")
    srv = comfy_server.ComfyServer(tmp_path_factory.mktemp("comfy_server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
