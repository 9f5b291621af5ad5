"""Activation checkpointing per transformer block inside one recomputed learning step.

Time-step checkpointing (``trajectory``) keeps memory flat in the number of steps, but one
recomputed step still holds the activation graph of a whole denoiser call.  Inside that step each
block named by the architecture table (``checkpoint_blocks(model)`` beside the unit table) runs
under ``torch.utils.checkpoint`` (non-reentrant): the forward keeps only the block's inputs, and the
backward recomputes the block's activations one block at a time.

Gates are replayed exactly: when a block runs, the gate tensors the ``GateController`` holds at that
moment are captured, and the block's recomputation runs with those very tensors (the same objects,
so no noise is resampled and the gradient reaches λ through the same graph).  Tensor inputs are
cloned inside the checkpointed function, so blocks that add residuals in place (ComfyUI FLUX's
``img += …``, MMDiT's ``x += …``) cannot corrupt the inputs the recomputation starts from.  Torch
function modes active at the forward (e.g. the memory preflight's kernels) are re-entered for the
recomputation, which the autograd engine would otherwise run without them.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

from .errors import EcoDiffError

MODES: tuple[str, ...] = ("auto", "on", "off")


def _fresh(obj: Any) -> Any:
    """Tensors (also inside tuples, lists and dicts) cloned; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_fresh(v) for v in obj)
    if isinstance(obj, list):
        return [_fresh(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    return obj


def _wrapped_forward(forward, controller):
    @functools.wraps(forward)
    def run_checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        gates = controller.current() if controller is not None else None
        modes = _get_current_function_mode_stack()

        def block(*a, **k):
            with contextlib.ExitStack() as stack:
                if controller is not None:
                    stack.enter_context(controller.replaying(gates))
                if modes and not _get_current_function_mode_stack():
                    for mode in modes:  # the backward does not carry torch-function modes over
                        stack.enter_context(mode)
                return forward(*_fresh(a), **_fresh(k))

        return checkpoint(block, *args, use_reentrant=False, **kwargs)

    return run_checkpointed


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, paths: Sequence[str], controller: Any = None) -> Iterator[int]:
    """Run the blocks of ``model`` at ``paths`` under activation checkpointing while inside.

    ``controller`` is the ``GateController`` whose gates the blocks see (``current()`` /
    ``replaying(values)``); None for an ungated model.  The wrapping is an instance attribute
    ``forward`` removed on exit, so a module shared with other model copies is left as found.
    Yields the number of wrapped blocks.

    Raises EcoDiffError if a path does not name a submodule.
    """
    wrapped: list[nn.Module] = []
    try:
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                raise EcoDiffError(f"block checkpointing: '{path}' is not a submodule of "
                                   f"{type(model).__name__}") from exc
            if "forward" in module.__dict__:
                continue  # already wrapped (nested call) or patched by someone else: leave it
            module.forward = _wrapped_forward(module.forward, controller)
            wrapped.append(module)
        yield len(wrapped)
    finally:
        for module in wrapped:
            del module.forward


def blocks_of_classes(model: nn.Module, class_names: Sequence[str]) -> list[str]:
    """Paths of the outermost submodules whose class (or a base) is named in ``class_names``.

    Nested matches are skipped: checkpointing a block already inside a checkpointed block would
    only recompute twice.
    """
    names = set(class_names)
    found: list[str] = []
    for path, module in model.named_modules():
        if not path or not any(c.__name__ in names for c in type(module).__mro__):
            continue
        if any(path.startswith(p + ".") for p in found):
            continue
        found.append(path)
    return found
