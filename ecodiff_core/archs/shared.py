"""Helpers shared by the architecture tables: class-name matching, module paths and the AdaLN
modulation group (the same in ComfyUI's and diffusers' FLUX).

Matching is by class name and structure only, so neither diffusers nor ComfyUI need be importable.
"""
from __future__ import annotations

from torch import nn

from ..errors import EcoDiffError
from ..units import Slice, UnitGroup


def has_class(obj: object, *names: str) -> bool:
    """True if the class of ``obj`` or one of its bases is called one of ``names``."""
    return any(c.__name__ in names for c in type(obj).__mro__)


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def block_label(path: str, depth: int) -> str:
    """The first ``depth`` components of a module path, e.g. 'down_blocks.1'."""
    return ".".join(path.split(".")[:depth])


def is_linear(module: object) -> bool:
    return isinstance(module, nn.Linear)


def modulation_group(linear: nn.Module, path: str, block: str) -> UnitGroup:
    """Output channels of an AdaLN modulation linear (shift/scale/gate): gate = its output rows."""
    if not is_linear(linear):
        raise EcoDiffError(f"modulation '{path}' is a {type(linear).__name__}, expected nn.Linear")
    return UnitGroup(
        name=f"{path}:channels", kind="channel", count=linear.out_features, width=1, owner=path,
        gates=(Slice(path, "out"),), block=block,
    )
