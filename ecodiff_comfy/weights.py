"""A MODEL's denoiser module and the weights it really computes with.

Facts this relies on (ComfyUI 0.3.64, checked again in ``tests/integration``):
- ``ModelPatcher.clone()`` shares the ``nn.Module``: nothing here mutates an input MODEL's module
  (weight copies are patcher-scoped weight wrappers); ComfyUI leaves the last loaded clone's weight
  patches in that module, so every weight read goes through ``own_weights`` (loads this clone,
  checks it);
- the executor runs nodes under ``torch.inference_mode()``: weights are inference tensors, which
  autograd may not save; while learning, the module holds non-inference views of the same storage
  (``plain_tensors``: no weight is copied, once or per forward), and ``comfy.ops`` layers read
  ``self.weight``/``self.bias`` through ``cast_bias_weight`` (manual cast, low-VRAM weight functions
  and weight wrappers are applied to the view, as to the original).
ComfyUI is imported lazily so the pack imports without it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..ecodiff_core.archs import find_layout
from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.learn import weights_digest
from ..ecodiff_core.units import Layout


def diffusion_module(model: Any) -> nn.Module:
    """The denoiser nn.Module inside a MODEL (ModelPatcher)."""
    base = getattr(model, "model", None)
    module = getattr(base, "diffusion_model", None)
    if not isinstance(module, nn.Module):
        raise EcoDiffError(f"expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")
    return module


def _own_weights_problem(model: Any, partial_ok: bool) -> str | None:
    """Why the shared module does not hold exactly ``model``'s weights (None when it does).

    ComfyUI keeps the last loaded clone's weight patches in the module its clones share;
    ``current_weight_patches_uuid`` names them and ``backup`` (shared by all clones) holds the
    originals of every weight patched in place.  Features are looked up with hasattr so another
    ComfyUI version answers with a clear error instead of silently wrong weights."""
    base = model.model
    if hasattr(base, "current_weight_patches_uuid") and hasattr(model, "patches_uuid") \
            and base.current_weight_patches_uuid != model.patches_uuid:
        return "another MODEL clone's weight patches (LoRA…) are loaded in the shared module"
    if getattr(base, "model_lowvram", False):
        return None if partial_ok else ("ComfyUI loaded the model only partially (low VRAM), "
                                        "weight patches are not merged")
    patches, backup = getattr(model, "patches", None), getattr(model, "backup", None)
    if isinstance(patches, dict) and isinstance(backup, dict):
        foreign = sorted(set(backup) - set(patches))
        if foreign:
            return f"weights patched for another MODEL clone are still in place ({foreign[0]}…)"
    return None


def require_own_weights(model: Any, partial_ok: bool = False) -> nn.Module:
    """The denoiser module of ``model``, checked to hold exactly ``model``'s weights right now
    (``partial_ok``: a low-VRAM load, where ComfyUI's weight functions patch at compute time,
    is accepted).  Raises EcoDiffError otherwise."""
    problem = _own_weights_problem(model, partial_ok)
    if problem is not None:
        raise EcoDiffError(f"cannot read this MODEL's own weights: {problem}. Please report this with your "
                           "ComfyUI version; as a workaround run the EcoDiff node before sampling other "
                           "variants of the model")
    return diffusion_module(model)


@contextlib.contextmanager
def own_weights(model: Any) -> Iterator[nn.Module]:
    """The denoiser module of ``model`` holding exactly the weights of ``model``: its own weight
    patches (LoRA…) merged, none of another clone's.  The ONE way the pack reads weights.

    MODEL clones share one nn.Module and ComfyUI leaves the last loaded clone's patches in it, so
    ``model`` is loaded through ComfyUI's own machinery (``load_models_gpu``, which unpatches the
    other clone from the shared backups and patches this one; fully, so no patch is deferred to
    low-VRAM weight functions) and checked on entry and on exit (no other clone may be loaded
    while the block reads).  Weight wrappers (``add_weight_wrapper``) are compute-time functions
    and stay out of the values read here: ``wrapped_weights`` gives the values they compute.
    Raises EcoDiffError where that cannot be guaranteed."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    module = require_own_weights(model)
    yield module
    require_own_weights(model)


@torch.no_grad()
def wrapped_weights(model: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The values ``model`` computes with for its weight-wrapped parameters (``add_weight_wrapper``:
    TrainLoraNode's LoRA, soft gates…), by parameter name in ``module`` (its denoiser, read through
    ``own_weights``).  As ``comfy.ops.cast_bias_weight`` does, each wrapper is applied in order to
    the weight cast to the compute dtype (the manual-cast dtype, else the weight's own); the result
    is stored back in the parameter's dtype.  Only wrapped keys are returned; keys outside the
    denoiser are ignored."""
    wrappers = getattr(model, "weight_wrapper_patches", None) or {}
    compute = getattr(model.model, "manual_cast_dtype", None)
    params = dict(module.named_parameters())
    out = {}
    for key, functions in wrappers.items():
        name = key.removeprefix("diffusion_model.")
        if not key.startswith("diffusion_model.") or name not in params or not functions:
            continue
        p = params[name]
        value = p.detach().to(compute or p.dtype, copy=True)
        for f in functions:
            value = f(value)
        out[name] = value.to(p.dtype)
    return out


def model_layout(model: Any) -> Layout:
    """The prunable units of a MODEL; UnsupportedArchitectureError names the supported ones."""
    return find_layout(diffusion_module(model))


def pruning_info(model: Any) -> dict | None:
    """The pruning record of a MODEL built by ``build_pruned_model`` (None for others)."""
    return getattr(model.model, "ecodiff_pruning", None)


def weights_fingerprint(model: Any) -> str:
    """``learn.weights_digest`` of the weights this MODEL computes with (its patches loaded), as
    learning records it in a mask's ``inputs["weights"]``."""
    with own_weights(model) as module:
        return weights_digest(module)


def refuse_pruned(model: Any, action: str) -> None:
    """EcoDiffError when ``model`` was pruned by EcoDiff (Apply Pruned Mask in prune mode, Load
    Pruned Model): masks are learned and applied for the full-size layout, so ``action`` (e.g.
    "learn a mask") needs the original model."""
    if pruning_info(model) is not None:
        raise EcoDiffError(f"this MODEL is already pruned by EcoDiff, so it cannot {action}: masks belong to "
                           "the full-size layout; connect the original model (the loader's MODEL output) instead")


def _storage_view(t: torch.Tensor, parameter: bool) -> torch.Tensor:
    """A normal (non-inference) tensor over ``t``'s storage: same values, same bytes, no copy
    (an ``nn.Parameter`` without grad where ``parameter``).  Made outside inference mode, autograd
    may save it for backward."""
    with torch.inference_mode(False):
        view = torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        return nn.Parameter(view, requires_grad=False) if parameter else view


@contextlib.contextmanager
def plain_tensors(module: nn.Module) -> Iterator[None]:
    """Every inference-tensor parameter/buffer of ``module`` is swapped for a non-inference view of
    the same storage (``_storage_view``: nothing is copied) for the duration, so autograd may save
    the weights; the originals are put back afterwards (where ComfyUI did not replace the view by
    then).  Call it once the MODEL is loaded (its weight patches merged): the views alias exactly
    the weights loaded."""
    swapped: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
    try:
        for sub in module.modules():
            for slots, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for name, t in list(slots.items()):
                    if t is None or not t.is_inference():
                        continue
                    slots[name] = _storage_view(t, is_param)
                    swapped.append((slots, name, t, slots[name]))
        yield
    finally:
        for slots, name, original, view in reversed(swapped):
            if slots.get(name) is view:
                slots[name] = original
