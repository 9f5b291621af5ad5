"""Pruned-model files (``models/ecodiff_pruned``): the pruned denoiser's weights as safetensors with
the record that rebuilds its shapes, and the loader that rebuilds the slim module from them.

ComfyUI's own loaders cannot load width-pruned weights (they build the full-size model from the
config they detect).  Facts this relies on (ComfyUI 0.3.64, checked in ``tests/integration``):
- model-config classes live in ``comfy.supported_models`` (subclasses of
  ``supported_models_base.BASE``), model classes in ``comfy.model_base`` (``BaseModel``), and a
  model class builds its ``diffusion_model`` on the device it is given (``meta``: no allocation);
- ``model_management.unet_offload_device`` / ``get_torch_device`` are where a loaded model rests
  and computes.
Files are checked before use (``ecodiff_core.pruned_record``); nothing named in a file is looked
up or called unless it is one of those real classes.
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..ecodiff_core.archs import find_layout
from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.prune import prune_model
from ..ecodiff_core.pruned_record import (
    PrunedFileError,
    check_pruned_record,
    check_record_layout,
    check_state_dict,
    config_from_json,
    other_dtypes,
)
from ..ecodiff_core.safetensors_file import check_format, read, write_atomic
from .attention_patches import fit_attention_patches
from .lora_on_pruned import pruned_patcher
from .pruned_models import set_precision
from .soft_gates import is_soft_gated
from .weights import own_weights, pruning_info, wrapped_weights

PRUNED_FORMAT = "ecodiff-pruned-model"
PRUNED_FORMAT_VERSION = 1
log = logging.getLogger("ecodiff")


def save_pruned_model(model: Any, path: Path) -> Path:
    """Safetensors of the pruned denoiser's weights + the record to rebuild its shapes; returns ``path``."""
    record = pruning_info(model)
    if record is None and is_soft_gated(model):
        raise EcoDiffError("Save Pruned Model got a soft-gated MODEL (Apply Pruned Mask in soft mode): soft mode "
                           "keeps the full-size weights and only multiplies removed units by 0, so there is "
                           "nothing smaller to save; set Apply Pruned Mask's mode to 'prune' to get a model to save")
    if record is None:
        raise EcoDiffError("Save Pruned Model needs a MODEL from Apply Pruned Mask (or Load Pruned Model); "
                           "unpruned models are saved with ComfyUI's own checkpoint savers")
    with own_weights(model) as module:
        wrapped = wrapped_weights(model, module)  # weight wrappers folded in, as pruning does
        sd = {k: wrapped.get(k, v).detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    dtype = record.get("weight_dtype") or (str(next(iter(sd.values())).dtype) if sd else "float32")
    record = {**record, "tensor_dtypes": other_dtypes(module, sd, dtype)}
    metadata = {"format": PRUNED_FORMAT, "format_version": str(PRUNED_FORMAT_VERSION),
                "record": json.dumps(record), "dtype": dtype.removeprefix("torch.")}
    path = write_atomic(path, sd, metadata)
    log.info("EcoDiff: saved pruned %s model to %s", record.get("arch"), path)
    return path


def _read_pruned(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    sd, meta = read(path)
    check_format(meta, path.name, PRUNED_FORMAT, PRUNED_FORMAT_VERSION, "an EcoDiff pruned model",
                 hint="; full checkpoints load with ComfyUI's own loaders")
    try:
        record = json.loads(meta["record"])
    except (KeyError, json.JSONDecodeError, RecursionError) as exc:
        raise PrunedFileError(f"{path.name} has damaged metadata: {type(exc).__name__}: {exc}") from exc
    return sd, check_pruned_record(record, path.name)


def _pack_model_configs() -> dict[str, type]:
    """Model-config classes the pack defines itself (the demo digits model), by class name."""
    from .demo_model import model_config_classes

    return model_config_classes()


def _pruned_classes(path: Path, record: dict) -> tuple[type, type]:
    """The ComfyUI model-config and model classes a checked record names.  Only real ones are
    accepted (subclasses of ``supported_models_base.BASE`` / ``model_base.BaseModel``); nothing else
    named in a file is looked up or called."""
    import comfy.model_base
    import comfy.supported_models
    import comfy.supported_models_base

    cfg_name, model_name = record["model_config_class"], record["model_class"]
    cfg_cls = getattr(comfy.supported_models, cfg_name, None) or _pack_model_configs().get(cfg_name)
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, comfy.supported_models_base.BASE)):
        raise PrunedFileError(f"{path.name} was pruned from a {cfg_name!r} model, which is not a model-config "
                              "class this ComfyUI knows; update ComfyUI, or the file is damaged")
    model_cls = getattr(comfy.model_base, model_name, None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, comfy.model_base.BaseModel)):
        raise PrunedFileError(f"{path.name}: record 'model_class' {model_name!r} is not a model class this "
                              "ComfyUI knows; update ComfyUI, or the file is damaged")
    if record["model_type"] not in comfy.model_base.ModelType.__members__:
        raise PrunedFileError(f"{path.name}: record 'model_type' {record['model_type']!r} is not one of "
                              f"{', '.join(comfy.model_base.ModelType.__members__)}")
    return cfg_cls, model_cls


def _rebuild_defects(load: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """The record is checked before use (``_read_pruned``, ``_pruned_classes``); what ComfyUI's model
    code still refuses while rebuilding from its config values becomes one PrunedFileError naming the
    file, instead of a TypeError/KeyError/... from deep inside ComfyUI."""
    @functools.wraps(load)
    def wrapper(path: Path) -> Any:
        try:
            return load(path)
        except PrunedFileError:
            raise
        except EcoDiffError as exc:  # e.g. the rebuilt model is no architecture we know
            if Path(path).name in str(exc):
                raise
            raise PrunedFileError(f"{Path(path).name}: {exc}") from exc
        except torch.OutOfMemoryError:
            raise
        except (TypeError, KeyError, IndexError, AttributeError, ValueError, AssertionError, ArithmeticError,
                RuntimeError) as exc:
            raise PrunedFileError(f"{Path(path).name}: ComfyUI cannot rebuild the model its record describes "
                                  f"({type(exc).__name__}: {exc}); the file is damaged or was written for "
                                  "another ComfyUI version") from exc

    return wrapper


@_rebuild_defects
def load_pruned_model(path: Path) -> Any:
    """Rebuild the slim module on the meta device (no full-size allocation), then load weights."""
    import comfy.model_base
    import comfy.model_management as mm

    sd, record = _read_pruned(path)
    cfg_cls, model_cls = _pruned_classes(path, record)
    cfg = cfg_cls(config_from_json(record["unet_config"]))
    cfg.unet_config = config_from_json(record["unet_config"])
    cfg.sampling_settings = config_from_json(record["sampling_settings"])
    set_precision(cfg, record, sd)
    model_type = comfy.model_base.ModelType[record["model_type"]]
    base = model_cls(cfg, model_type=model_type, device=torch.device("meta"))
    layout = find_layout(base.diffusion_model)
    keep = check_record_layout(record, layout, path.name)
    pruned = prune_model(base.diffusion_model, layout, keep)
    fit_attention_patches(pruned)
    check_state_dict(pruned, sd, path.name, cfg.manual_cast_dtype, record.get("tensor_dtypes", {}))
    offload = mm.unet_offload_device()
    missing, unexpected = pruned.load_state_dict(sd, strict=False, assign=True)
    meta_left = [n for n, t in list(pruned.named_parameters()) + list(pruned.named_buffers()) if t.is_meta]
    if unexpected or meta_left:
        raise EcoDiffError(f"{path.name} does not fit the rebuilt model: unexpected {unexpected[:3]}, "
                           f"missing {meta_left[:3]}")
    full, base.diffusion_model = base.diffusion_model, pruned.to(offload)
    base.ecodiff_pruning = record
    log.info("EcoDiff: loaded pruned %s model from %s", record["arch"], path)
    return pruned_patcher(base, full, mm.get_torch_device(), offload)
