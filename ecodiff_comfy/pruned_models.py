"""Pruned MODELs: the plan for a mask, and a NEW, physically smaller MODEL built from it, with the
record needed to rebuild its shapes (architecture config, kept units, precision).

Facts this relies on (ComfyUI 0.3.64, checked again in ``tests/integration``):
- ``ModelPatcher.clone()`` shares the ``nn.Module`` and the ``comfy.model_base`` object: the pruned
  MODEL gets a deep copy of the base object around the new module, so the input is never touched;
- a model config's ``set_inference_dtype`` sets the weight dtype and manual cast its layers are
  built with (as ComfyUI's loaders do); ``model_management.unet_manual_cast`` picks the manual cast
  for a weight dtype on this device;
- ``model_options`` and object patches carry over to the new patcher (those of the denoiser's own
  submodules do not: they refer to the full-size module).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.maskfile import MaskState
from ..ecodiff_core.plan import PrunePlan, PruneTarget, align_for_device, plan_pruning, resolve_align
from ..ecodiff_core.prune import check_keep, physical_keep, prune_model
from ..ecodiff_core.pruned_record import config_to_json
from ..ecodiff_core.report import PruneReport
from ..ecodiff_core.units import Layout
from .attention_patches import fit_attention_patches
from .lora_on_pruned import pruned_patcher
from .weights import diffusion_module, model_layout, own_weights, refuse_pruned, wrapped_weights

log = logging.getLogger("ecodiff")


def device_align(model: Any) -> int:
    """The feature multiple pruned modules of ``model`` should keep on its load device (see
    ``PruneTarget.align``): 8 on CUDA, where GEMMs of multiples of 8 stay on tensor-core paths; 1
    (no alignment) elsewhere.  What ``align="auto"`` means."""
    return align_for_device(getattr(model, "load_device", None))


def plan_for_mask(model: Any, state: MaskState, target: PruneTarget,
                  align: int | str | None = None) -> tuple[Layout, PrunePlan]:
    """Keep masks for ``target`` (the engine keeps the units that must stay, ``min_keep``).

    ``align``: the feature multiple every pruned module keeps (``PruneTarget.align``, 1 = off);
    "auto" asks the MODEL's device (``device_align``), "off" is 1; None keeps ``target.align``.
    Raises SettingsError for another value (``plan.resolve_align``)."""
    if align is not None:
        align = device_align(model) if align == "auto" else resolve_align(align, None)
    if align is not None and align != target.align:
        target = dataclasses.replace(target, align=align)  # PruneTarget checks the value
    layout = model_layout(model)
    state.check_layout(layout)
    return layout, plan_pruning(diffusion_module(model), layout, state.logits, target, settings=state.settings)


def _new_base_model(model: Any, pruned: nn.Module, record: dict) -> Any:
    """A new ``comfy.model_base`` object around ``pruned``; the input's objects are not touched."""
    base = model.model
    memo = {id(base.diffusion_model): pruned}
    for attr in ("current_patcher",):
        if hasattr(base, attr):
            memo[id(getattr(base, attr))] = None
    new = copy.deepcopy(base, memo)
    new.model_config = copy.deepcopy(base.model_config)
    new.ecodiff_pruning = record
    for attr in ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram", "current_weight_patches_uuid"):
        if hasattr(new, attr):
            delattr(new, attr)
    return new


def _wrap(model: Any, base: Any) -> Any:
    """A new ModelPatcher for ``base`` carrying over ``model``'s options and non-weight object patches."""
    import comfy.model_patcher

    patcher = pruned_patcher(base, diffusion_module(model), model.load_device, model.offload_device)
    patcher.model_options = comfy.model_patcher.create_model_options_clone(model.model_options) \
        if hasattr(comfy.model_patcher, "create_model_options_clone") else copy.deepcopy(model.model_options)
    for key, obj in model.object_patches.items():
        if not key.startswith("diffusion_model."):
            patcher.add_object_patch(key, obj)
    if hasattr(model, "force_cast_weights"):  # ModelComputeDtype: layers cast to the patched compute dtype
        patcher.force_cast_weights = model.force_cast_weights
    return patcher


def build_pruned_model(model: Any, layout: Layout, keep: dict[str, torch.Tensor],
                       logits: dict[str, torch.Tensor], align: int = 1) -> tuple[Any, PruneReport]:
    """A NEW, physically smaller MODEL; ``model`` and its module stay as they were.  Units that must
    stay although ``keep`` removes them (``min_keep``) stay silenced: the highest-``logits`` ones.
    ``align``: the feature multiple ``keep`` was planned with (``PrunePlan.align``), kept in the record."""
    keep = check_keep(layout, keep)
    adjusted, silenced = physical_keep(layout, keep, logits)
    with torch.inference_mode(False), own_weights(model) as source:
        pruned = prune_model(source, layout, keep, logits, weights=wrapped_weights(model, source))
        fit_attention_patches(pruned)
        report = PruneReport.build(source, pruned, layout, keep)
    record = pruning_record(model, layout, adjusted, silenced, align)
    if silenced:
        log.info("EcoDiff: %d emptied groups kept as silenced units (see the report)", len(silenced))
    return _wrap(model, _new_base_model(model, pruned, record)), report


def pruning_record(model: Any, layout: Layout, keep: dict[str, torch.Tensor], silenced: list[str],
                   align: int = 1) -> dict:
    """Everything needed to rebuild the pruned module's shapes from the base architecture, and the
    feature multiple ``align`` the kept units were planned with (1 = none)."""
    base = model.model
    refuse_pruned(model, "be pruned again")
    cfg = base.model_config
    return {
        "arch": layout.arch,
        "fingerprint": layout.fingerprint(),
        "model_config_class": type(cfg).__name__,
        "unet_config": config_to_json(cfg.unet_config),
        "sampling_settings": config_to_json(getattr(cfg, "sampling_settings", {})),
        "model_type": base.model_type.name,
        "model_class": type(base).__name__,
        "kept": {name: torch.nonzero(k).reshape(-1).tolist() for name, k in keep.items()},
        "counts": {g.name: g.count for g in layout.groups},
        "silenced": list(silenced),
        "align": align,
        **precision_record(model),
    }


def precision_record(model: Any) -> dict:
    """How ComfyUI stores and computes the weights of ``model``: ``weight_dtype`` (what the model
    config builds layers in), ``manual_cast_dtype`` (compute dtype of ComfyUI's manual cast, None
    when weights compute in their own dtype), ``scaled_fp8`` (weight dtype of scaled-fp8 layers,
    else None) and ``fp8_optimizations``; dtypes as torch names ("float8_e4m3fn")."""
    base, cfg = model.model, model.model.model_config
    cast = model.get_model_object("manual_cast_dtype") if hasattr(model, "get_model_object") \
        else getattr(base, "manual_cast_dtype", None)
    weight = cfg.unet_config.get("dtype")
    if not isinstance(weight, torch.dtype):
        weight = base.get_dtype() if hasattr(base, "get_dtype") else None
    return {
        "weight_dtype": _dtype_name(weight),
        "manual_cast_dtype": _dtype_name(cast),
        "scaled_fp8": _dtype_name(getattr(cfg, "scaled_fp8", None)),
        "fp8_optimizations": bool(getattr(cfg, "optimizations", {}).get("fp8", False)),
    }


def _dtype_name(dtype: Any) -> str | None:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None


def _dtype_from_name(name: Any, what: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise EcoDiffError(f"the pruned model's record has {what} {name!r}, which is not a floating-point torch "
                           "dtype; the file is damaged: prune and save the model again")
    return dtype


def set_precision(cfg: Any, record: dict, sd: dict[str, torch.Tensor]) -> None:
    """Build ``cfg`` with the saved model's weight dtype and manual cast, as ComfyUI's loaders do
    (``set_inference_dtype``).  Records written before these were stored: the weight dtype of the
    record's unet_config (else the state dict's dominant one), the manual cast ComfyUI picks for
    that dtype on this device (``unet_manual_cast``), scaled fp8 when the layers carry scales."""
    import comfy.model_management as mm

    if "weight_dtype" in record:
        weight = _dtype_from_name(record["weight_dtype"], "weight_dtype")
        cast = _dtype_from_name(record.get("manual_cast_dtype"), "manual_cast_dtype")
        scaled = _dtype_from_name(record.get("scaled_fp8"), "scaled_fp8")
        fp8_optimizations = bool(record.get("fp8_optimizations", False))
    else:
        weight = cfg.unet_config.get("dtype")
        if not isinstance(weight, torch.dtype):
            counts: dict[torch.dtype, int] = {}
            for t in sd.values():
                if t.is_floating_point():
                    counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
            weight = max(counts, key=counts.get) if counts else torch.float32
        supported = getattr(cfg, "supported_inference_dtypes", [torch.float16, torch.bfloat16, torch.float32])
        cast = mm.unet_manual_cast(weight, mm.get_torch_device(), supported)
        scaled = next((sd[k[:-len("scale_weight")] + "weight"].dtype for k in sd
                       if k.endswith(".scale_weight") and k[:-len("scale_weight")] + "weight" in sd), None)
        fp8_optimizations = False
    cfg.set_inference_dtype(weight, cast)
    if scaled is not None:
        cfg.scaled_fp8 = scaled
    if fp8_optimizations:
        cfg.optimizations = dict(getattr(cfg, "optimizations", {}), fp8=True)
