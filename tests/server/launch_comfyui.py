"""Run ComfyUI's ``main.py`` (from ``$COMFYUI_PATH``) with the given arguments, for the server tests.

Same as ``python $COMFYUI_PATH/main.py ARGS`` except for one workaround: where torchvision's wheel
cannot load its C operators beside the installed torch (PyPI's CUDA wheels beside a CPU torch),
``import torchvision`` fails in its meta registrations; the two operator schemas it needs are declared
first, as ``tests/comfy_tiny.py`` does in-process.  On a healthy install this does nothing.
"""
from __future__ import annotations

import os
import runpy
import sys


def _declare_torchvision_ops() -> None:
    """``tests/comfy_tiny.py``'s workaround, loaded under a private name (keeps tests/ off sys.path)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "comfy_tiny.py")
    spec = importlib.util.spec_from_file_location("ecodiff_launch_comfy_tiny", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    module._declare_torchvision_ops()


def main() -> None:
    root = os.environ.get("COMFYUI_PATH")
    if not root or not os.path.isfile(os.path.join(root, "main.py")):
        sys.exit("COMFYUI_PATH must point at a ComfyUI checkout (with main.py)")
    root = os.path.abspath(root)
    main_py = os.path.join(root, "main.py")
    sys.path.insert(0, root)
    _declare_torchvision_ops()
    sys.argv = [main_py, *sys.argv[1:]]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
