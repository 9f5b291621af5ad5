"""LoRAs made for the full model, loaded onto a pruned MODEL with ComfyUI's own loaders.

A pruned MODEL is a ``PrunedModelPatcher`` (``ModelPatcher.clone()`` keeps the class): its
``add_patches`` / ``add_hook_patches`` fit every incoming weight patch to the pruned weights with the
engine's ``lora_slice`` cuts, which are derived from the unit groups and the pruning record and kept
on the model object (``ecodiff_weight_cuts``), so clones, LoRA stacks and models loaded from file all
carry them.  Per layer, by shape and never by guess:

- a patch shaped like the pruned weight (a LoRA trained on the pruned model, e.g. by LoRA Recover)
  is added unchanged;
- a patch shaped like the full-size weight is sliced: LoRA ``lora_up`` rows / ``lora_down`` columns,
  LoHa factors, LoKr and ``diff`` deltas, ``diff_b`` biases, DoRA magnitudes; ComfyUI's offset
  patches into fused q/k/v and FLUX ``linear1`` (diffusers-format keys, computed from the full-size
  ``unet_config``) get the offsets of the pruned block;
- a patch on features that are all removed (an emptied attention's q/k/v/out) has no effect on the
  hard-gated model: it is accounted as applied, not dropped unnoticed;
- anything else (DoRA norms across a cut dimension, OFT/BOFT/GLoRA whose change depends on the full
  weight, a patch of a third shape) raises ``LoraSliceError`` naming the layers and the way out
  (load the LoRA before Apply Pruned Mask: it is then merged into the pruned weights).

ComfyUI's LoRA key map is built from the model's state dict, which no longer lists the weights of
emptied attentions; ``install_key_map`` wraps ``comfy.lora.model_lora_keys_unet`` (once; other
models get exactly the original map) so those keys are found too and no LoRA key is "not loaded".
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from torch import nn

from ..ecodiff_core.archs import find_layout
from ..ecodiff_core.errors import EcoDiffError, LoraSliceError
from ..ecodiff_core.lora_slice import WeightCut, silenced_units, weight_cuts
from ..ecodiff_core.pruned_record import check_record_layout

CUTS_ATTR = "ecodiff_weight_cuts"
PREFIX = "diffusion_model."
log = logging.getLogger("ecodiff")


# --------------------------------------------------------------------------------------------
# making a pruned MODEL
# --------------------------------------------------------------------------------------------
def pruned_patcher(base: Any, full: nn.Module, load_device: Any, offload_device: Any) -> Any:
    """A ``PrunedModelPatcher`` for the pruned ``comfy.model_base`` object ``base`` (which carries its
    pruning record as ``ecodiff_pruning``); ``full`` is the full-size denoiser it was pruned from (a
    ``meta`` copy is enough: only shapes are read)."""
    attach_cuts(base, full)
    install_key_map()
    clear_load_flags(base.diffusion_model)
    return patcher_class()(base, load_device=load_device, offload_device=offload_device)


def clear_load_flags(module: nn.Module) -> None:
    """Drop ComfyUI's per-module "weight patches merged" flag that a pruned module inherits when it
    is copied from a loaded one: ComfyUI would skip this model's own weight patches (LoRAs) on
    load.  ``ModelPatcher.unpatch_model`` removes the flag the same way."""
    for sub in module.modules():
        if hasattr(sub, "comfy_patched_weights"):
            del sub.comfy_patched_weights


def attach_cuts(base: Any, full: nn.Module) -> dict[str, WeightCut]:
    """Compute the weight cuts of the pruned ``base`` from its record and store them on it."""
    record = getattr(base, "ecodiff_pruning", None)
    if record is None:
        raise EcoDiffError("internal: a pruned model needs its pruning record before its LoRA cuts")
    layout = find_layout(full)
    keep = check_record_layout(record, layout, "the pruned model")
    cuts = weight_cuts(full, layout, keep, silenced_units(keep, list(record.get("silenced", []))))
    setattr(base, CUTS_ATTR, cuts)
    return cuts


@functools.cache
def _subclass(cls: type) -> type:
    return type(f"Pruned{cls.__name__}", (_PrunedPatches, cls), {"__module__": __name__})


def patcher_class() -> type:
    """ComfyUI's ModelPatcher with patch fitting for pruned weights."""
    import comfy.model_patcher

    return _subclass(comfy.model_patcher.ModelPatcher)


class _PrunedPatches:
    """Mixin over ModelPatcher: incoming weight patches are fitted to the pruned weights."""

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        fitted, original, no_effect = fit_patches(self.model, patches)
        added = super().add_patches(fitted, strength_patch, strength_model)
        return [original.get(k, k) for k in added] + no_effect

    def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
        fitted, original, no_effect = fit_patches(self.model, patches)
        added = super().add_hook_patches(hook, fitted, strength_patch, strength_model)
        return [original.get(k, k) for k in added] + no_effect


# --------------------------------------------------------------------------------------------
# ComfyUI's LoRA key map
# --------------------------------------------------------------------------------------------
def install_key_map() -> None:
    """Wrap ``comfy.lora.model_lora_keys_unet`` once: for a pruned model it also maps the generic
    (``diffusion_model.<path>``) and ``lora_unet_<path>`` keys of weights that pruning removed."""
    import comfy.lora

    current = comfy.lora.model_lora_keys_unet
    if getattr(current, "ecodiff_wrapped", False):
        return

    @functools.wraps(current)
    def model_lora_keys_unet(model, *args, **kwargs):
        key_map = current(model, *args, **kwargs)
        cuts = getattr(model, CUTS_ATTR, None)
        if cuts:
            for path, cut in cuts.items():
                if cut.removed:
                    key = f"{PREFIX}{path}.weight"
                    key_map.setdefault(f"{PREFIX}{path}", key)
                    key_map.setdefault(f"lora_unet_{path.replace('.', '_')}", key)
        return key_map

    model_lora_keys_unet.ecodiff_wrapped = True
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet


# --------------------------------------------------------------------------------------------
# fitting patches
# --------------------------------------------------------------------------------------------
def fit_patches(base: Any, patches: dict) -> tuple[dict, dict, list]:
    """(patches for the pruned weights, {fitted key: given key}, given keys that have no effect).

    Keys are ComfyUI's: a state-dict key or ``(key, (dim, start, length)[, function])``.  Raises
    LoraSliceError listing every layer that cannot be fitted exactly."""
    cuts: dict[str, WeightCut] | None = getattr(base, CUTS_ATTR, None)
    if not cuts:
        return patches, {}, []
    fitted, original, no_effect, problems = {}, {}, [], []
    for k, value in patches.items():
        key, offset, rest = (k, None, ()) if isinstance(k, str) else (k[0], k[1], tuple(k[2:]))
        path, _, param = key.removeprefix(PREFIX).rpartition(".")
        cut = cuts.get(path) if key.startswith(PREFIX) and param in ("weight", "bias") else None
        if cut is None or not cut.changed:
            fitted[k] = value
            continue
        try:
            if param == "bias":
                cut = cut.bias_cut()
            new_k = k
            if offset is not None:
                cut, start, length = cut.narrow(offset[0], offset[1], offset[2])
                new_k = (key, (offset[0], start, length)) + rest
            if cut.empty:
                no_effect.append(k)
                continue
            fitted[new_k] = fit_value(value, cut, key, bias=param == "bias")
            original[new_k] = k
        except LoraSliceError as exc:
            problems.append(f"{key}{'' if offset is None else f' {tuple(offset)}'}: {exc}")
    if no_effect:
        log.info("EcoDiff: %d LoRA patches address only removed units of the pruned model (no effect, as in "
                 "the hard-gated full model)", len(no_effect))
    if problems:
        listed = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LoraSliceError(
            f"{len(problems)} weight patches (LoRA layers) cannot be fitted to this pruned model: {listed}. "
            "LoRAs made for the full model are sliced to the kept heads/neurons/channels where that is exact; "
            "for these, load the LoRA on the full model BEFORE Apply Pruned Mask (LoRA loader between the "
            "model loader and Apply Pruned Mask): it is then merged into the pruned weights.")
    return fitted, original, no_effect


def _adapter_base() -> type | None:
    try:
        import comfy.weight_adapter as wa
    except ImportError:
        return None
    return getattr(wa, "WeightAdapterBase", None)


def _shape2(t: torch.Tensor) -> tuple[int, ...]:
    return (int(t.shape[0]), int(math.prod(t.shape[1:]))) if t.ndim >= 2 else tuple(int(s) for s in t.shape)


def fit_value(value: Any, cut: WeightCut, key: str, bias: bool = False) -> Any:
    """One patch value fitted to ``cut``: unchanged when shaped like the pruned weight, sliced when
    shaped like the full-size weight, LoraSliceError otherwise."""
    base_cls = _adapter_base()
    if base_cls is not None and isinstance(value, base_cls):
        name, weights = value.name, tuple(value.weights)

        def rebuild(w):
            return type(value)(value.loaded_keys, w)
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        name, weights = value[0], tuple(value[1])

        def rebuild(w):
            return (name, w)
    elif isinstance(value, tuple) and len(value) == 1:
        name, weights = "diff", tuple(value)

        def rebuild(w):
            return w
    elif isinstance(value, list) and value and isinstance(value[0], tuple) and isinstance(value[0][0], torch.Tensor):
        name, weights = "weights", (value[0][0],)  # another model's weight (model merging)
        rebuild = None
    else:
        raise LoraSliceError(f"a patch of type {type(value).__name__} cannot be fitted")

    pruned = (cut.shape[0],) if bias else cut.shape
    full = (cut.full[0],) if bias else cut.full

    def classify(shape: tuple[int, ...]) -> str:
        if shape == pruned:
            return "pruned"
        if shape == full:
            return "full"
        raise LoraSliceError(f"the {name} patch has shape {shape}; the full-size weight is {full} and the pruned "
                             f"one {pruned}: it was made for another model")

    if name in ("diff", "set", "weights", "model_as_lora"):
        t = weights[0]
        if classify(tuple(t.shape)) == "pruned":
            return value
        if name in ("weights", "model_as_lora"):
            raise LoraSliceError(f"a full-size '{name}' patch depends on the full model's weights")
        sliced = cut.slice_bias(t) if bias else cut.slice_matrix(t.reshape(cut.full))
        return rebuild((sliced,) + weights[1:])
    if bias:
        raise LoraSliceError(f"a {name} patch on a bias cannot be fitted")
    if name == "lora":
        up, down, alpha, mid, dora = weights[0], weights[1], weights[2], weights[3], weights[4]
        reshape = weights[5] if len(weights) > 5 else None
        if classify((int(up.shape[0]), int(math.prod(down.shape[1:])))) == "pruned":
            return value
        if mid is not None or reshape is not None or up.ndim != 2 or down.ndim != 2:
            raise LoraSliceError("a LoCon/Tucker LoRA (mid weight or reshape) on a Linear cannot be sliced")
        up, down = cut.slice_factors(up, down)
        dora = None if dora is None else cut.slice_dora_scale(dora)
        return rebuild((up, down, alpha, None, dora) + weights[5:])
    if name == "loha":
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora = weights[:8]
        if classify((int(w1a.shape[0]), int(math.prod(w1b.shape[1:])))) == "pruned":
            return value
        if t1 is not None or t2 is not None:
            raise LoraSliceError("a LoHa with Tucker factors cannot be sliced")
        w1a, w1b = cut.slice_factors(w1a, w1b)
        w2a, w2b = cut.slice_factors(w2a, w2b)
        dora = None if dora is None else cut.slice_dora_scale(dora)
        return rebuild((w1a, w1b, alpha, w2a, w2b, None, None, dora) + weights[8:])
    if name == "lokr":
        return _fit_lokr(value, weights, cut, key, classify)
    raise LoraSliceError(f"a {name} patch changes the weight through the full weight itself and cannot be "
                         "sliced exactly")


def _lokr_shape(weights: tuple) -> tuple[int, int]:
    w1, w2, _, w1_a, w1_b, w2_a, w2_b = weights[:7]
    a, b = w1.shape[:2] if w1 is not None else (w1_a.shape[0], w1_b.shape[1])
    c, d = (w2.shape[0], math.prod(w2.shape[1:])) if w2 is not None else (w2_a.shape[0], math.prod(w2_b.shape[1:]))
    return int(a) * int(c), int(b) * int(d)


def _fit_lokr(value: Any, weights: tuple, cut: WeightCut, key: str, classify) -> Any:
    """LoKr: the Kronecker product is not closed under row/column selection, so the full delta is
    computed once (by ComfyUI's own code, strength 1, without DoRA) and sliced."""
    import comfy.lora

    if classify(_lokr_shape(weights)) == "pruned":
        return value
    if weights[7] is not None:
        raise LoraSliceError("a LoKr with a Tucker factor cannot be sliced")
    dora = weights[8]
    plain = tuple(weights[:8]) + (None,) + tuple(weights[9:])
    if isinstance(value, tuple):
        plain_value = (value[0], plain)
    else:
        plain_value = type(value)(value.loaded_keys, plain)
    zero = torch.zeros(cut.full, dtype=torch.float32)
    delta = comfy.lora.calculate_weight([(1.0, plain_value, 1.0, None, None)], zero, key)
    sliced = cut.slice_matrix(delta)
    if dora is None:
        return ("diff", (sliced,))
    return _delta_adapter_class()(set(), (sliced, cut.slice_dora_scale(dora)))


@functools.cache
def _delta_adapter_class() -> type:
    """A weight adapter holding a precomputed (sliced) delta with a DoRA magnitude."""
    import comfy.model_management
    import comfy.weight_adapter.base as wab

    class SlicedDeltaAdapter(wab.WeightAdapterBase):
        name = "ecodiff_sliced_delta"

        def __init__(self, loaded_keys, weights):
            self.loaded_keys = loaded_keys
            self.weights = weights

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            delta = comfy.model_management.cast_to_device(self.weights[0], weight.device, intermediate_dtype, copy=True)
            return wab.weight_decompose(self.weights[1], weight, delta.reshape(weight.shape), 1.0, strength,
                                        intermediate_dtype, function)

    return SlicedDeltaAdapter
