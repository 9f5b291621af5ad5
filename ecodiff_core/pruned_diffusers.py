"""Pruned diffusers denoisers on disk: one safetensors file with the weights and the record to rebuild.

The record (JSON in the metadata ``record``) holds the denoiser's class and diffusers config, the
layout fingerprint and, per unit group, the units kept (as ``prune.physical_keep`` gives them;
silenced units are stored with their zeroed weights).  ``load_pruned_denoiser`` rebuilds the base
model from the config on the meta device (no memory, no random init), prunes that skeleton with the
kept units and assigns the stored tensors, so the result is the diffusers model object the pipeline
expects::

    pipe.unet = load_pruned_denoiser("pruned.safetensors")          # SD1.5 / SDXL
    pipe.transformer = load_pruned_denoiser("pruned.safetensors")   # SD3 / FLUX

Its ``config`` still describes the unpruned model (the unit counts live in the modules), so save it
with ``save_pruned_denoiser``, not ``save_pretrained``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .archs import find_layout
from .errors import EcoDiffError
from .pipelines import DENOISER_CLASSES, diffusers_module
from .prune import physical_keep, prune_model
from .pruned_record import (
    PrunedFileError,
    _is_counts,
    _is_json_config,
    _is_kept,
    _is_str_list,
    check_kept_units,
    check_record_layout,
    check_state_dict,
)
from .safetensors_file import check_format, read, write_atomic
from .units import Layout

FORMAT = "ecodiff-pruned-diffusers"
FORMAT_VERSION = 1

RECORD_FIELDS = {
    "arch": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "fingerprint": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "diffusers_class": (lambda v: v in DENOISER_CLASSES, f"one of {', '.join(DENOISER_CLASSES)}"),
    "config": (lambda v: isinstance(v, dict) and _is_json_config(v), "a JSON object (the diffusers config)"),
    "kept": (_is_kept, "an object mapping each unit group to a list of integer unit indices"),
    "counts": (_is_counts, "an object mapping each unit group to its unit count (an integer >= 1)"),
    "silenced": (_is_str_list, "a list of unit-group names"),
}


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(config, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def pruning_record(model: nn.Module, layout: Layout, keep: dict[str, torch.Tensor],
                   scores: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The record that rebuilds ``prune_model(model, layout, keep, scores)`` from ``model``'s config."""
    physical, silenced = physical_keep(layout, keep, scores)
    return {
        "arch": layout.arch, "fingerprint": layout.fingerprint(), "diffusers_class": type(model).__name__,
        "config": _config_dict(model),
        "kept": {name: torch.nonzero(k).reshape(-1).tolist() for name, k in physical.items()},
        "counts": {g.name: g.count for g in layout.groups}, "silenced": list(silenced),
    }


def save_pruned_denoiser(path: str | os.PathLike, pruned: nn.Module, record: dict[str, Any],
                         extra: dict[str, Any] | None = None) -> Path:
    """Write ``pruned``'s state dict and ``record`` (from :func:`pruning_record` of the ORIGINAL
    model) atomically; ``extra`` (JSON-able: the plan, the mask's summary) goes to metadata ``info``."""
    path = Path(path)
    if path.is_dir():
        raise EcoDiffError(f"output {path} is a folder; give a file name such as pruned.safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in pruned.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "record": json.dumps(record),
                "info": json.dumps(extra or {})}
    write_atomic(path, tensors, metadata)
    return path


def read_pruned_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(record, info, tensors) of a pruned-denoiser file, the record checked.  Raises PrunedFileError."""
    path = Path(path)
    source = path.name
    if not path.is_file():
        raise PrunedFileError(f"pruned model file not found: {path}")
    tensors, meta = read(path, PrunedFileError, "safetensors file")
    check_format(meta, source, FORMAT, FORMAT_VERSION, "a pruned diffusers denoiser of EcoDiff", PrunedFileError,
                 hint="; prune with: python -m ecodiff_core prune")
    try:
        record, info = json.loads(meta.get("record", "")), json.loads(meta.get("info", "{}"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PrunedFileError(f"{source}: the pruning record is not valid JSON ({exc}); the file is damaged") from exc
    if not isinstance(record, dict):
        raise PrunedFileError(f"{source}: the pruning record is not a JSON object; the file is damaged")
    for key, (ok, what) in RECORD_FIELDS.items():
        if key not in record:
            raise PrunedFileError(f"{source}: the pruning record lacks '{key}'; the file is damaged")
        if not ok(record[key]):
            raise PrunedFileError(f"{source}: record field '{key}' must be {what}; the file is damaged")
    return check_kept_units(record, source), info if isinstance(info, dict) else {}, tensors


def load_pruned_denoiser(path: str | os.PathLike, device: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None) -> nn.Module:
    """The pruned diffusers denoiser of a file written by :func:`save_pruned_denoiser` (or
    ``python -m ecodiff_core prune``), in eval mode on ``device`` (``dtype``: cast the weights;
    default: as stored).  Raises PrunedFileError for damaged or foreign files."""
    record, _, tensors = read_pruned_file(path)
    source = Path(path).name
    cls = getattr(diffusers_module(), record["diffusers_class"])
    try:
        with torch.device("meta"):
            base = cls.from_config(record["config"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise PrunedFileError(f"{source}: diffusers cannot build a {record['diffusers_class']} from the stored "
                              f"config ({exc}); the file is damaged or was made with another diffusers") from exc
    layout = find_layout(base)
    keep = check_record_layout(record, layout, source)
    skeleton = prune_model(base, layout, keep)
    matrices = [t.dtype for t in tensors.values() if t.is_floating_point() and t.ndim >= 2]
    stored = max(set(matrices), key=matrices.count) if matrices else torch.float32
    nn.Module.to(skeleton, dtype=stored)  # plain cast: diffusers' .to() warns about its fp32 modules
    check_state_dict(skeleton, tensors, source, compute_dtype=torch.float32)  # fp32 norms/biases accepted
    skeleton.load_state_dict(tensors, assign=True)
    left = [n for n, t in list(skeleton.named_parameters()) + list(skeleton.named_buffers()) if t.is_meta]
    if left:
        raise PrunedFileError(f"{source}: the file lacks {left[0]} (and {len(left) - 1} more); the file is damaged")
    return nn.Module.to(skeleton, device=device, dtype=dtype).eval()
