"""Server end-to-end tests: a real ComfyUI (``$COMFYUI_PATH/main.py --cpu``) on 127.0.0.1 with this pack and
the test-only tiny-models pack; skipped unless COMFYUI_PATH points at a ComfyUI checkout."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import comfy_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if comfy_server.comfy_path() is None:
        pytest.skip(comfy_server.SKIP_NO_COMFYUI)
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
