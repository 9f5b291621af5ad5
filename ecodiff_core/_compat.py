"""Import guard for a CUDA-only ``torchvision`` wheel next to a CPU ``torch``.

Such a wheel fails at ``import torchvision`` (``operator torchvision::nms does not exist``), and
``diffusers`` -> ``peft`` -> ``transformers`` then fail to import too.  The Python parts of torchvision
are usable once the missing operator schemas exist, so define them and retry.  A no-op when
torchvision is absent or imports fine.
"""
from __future__ import annotations

import sys

import torch

_LIB: torch.library.Library | None = None


def ensure_torchvision_importable() -> None:
    global _LIB
    try:
        import torchvision
    except ImportError:
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
