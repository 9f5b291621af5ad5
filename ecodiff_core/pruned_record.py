"""The pruning record of a pruned-model file: its schema, checked before any of it is used.

A pruned-model file (see ``ecodiff_comfy.pruned_files.save_pruned_model``) carries a JSON ``record`` that
says how to rebuild the slim module: the base architecture's config and, per unit group, which units
were kept.  Files come from disk (downloads, hand edits), so every field is checked here before the
host rebuilds anything from it; ComfyUI-specific checks (that the class names are real ComfyUI
model-config / model classes) live in the bridge.  Unknown extra keys are accepted (newer writers
may add fields); a known key must have its type.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import EcoDiffError
from .plan import MAX_ALIGN
from .units import Layout


class PrunedFileError(EcoDiffError):
    """A pruned-model file is damaged, hand-edited into an inconsistent state, or not ours."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_identifier(value: Any) -> bool:
    return isinstance(value, str) and value.isidentifier() and not value.startswith("_")


def _is_json_config(value: Any, depth: int = 0) -> bool:
    """JSON values as ``config_to_json`` writes them: scalars, lists, str-keyed dicts, and
    ``{"__dtype__": name}`` for torch dtypes (the name must be a real torch dtype)."""
    if depth > 16:
        return False
    if isinstance(value, dict):
        if "__dtype__" in value:
            name = value["__dtype__"]
            return set(value) == {"__dtype__"} and _is_identifier(name) and isinstance(
                getattr(torch, name, None), torch.dtype)
        return all(isinstance(k, str) and _is_json_config(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_json_config(v, depth + 1) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def config_to_json(obj: Any) -> Any:
    """A model config (``unet_config``, ``sampling_settings``) as JSON values: dict keys as strings,
    tuples as lists, torch dtypes as ``{"__dtype__": "float16"}``, other objects as their ``str``."""
    if isinstance(obj, dict):
        return {str(k): config_to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_json(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def config_from_json(obj: Any) -> Any:
    """The inverse of ``config_to_json`` on a checked record (``{"__dtype__": name}`` → the torch dtype)."""
    if isinstance(obj, dict):
        if set(obj) == {"__dtype__"}:
            return getattr(torch, obj["__dtype__"])
        return {k: config_from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [config_from_json(v) for v in obj]
    return obj


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_int(v) and v >= 1 for v in value.values())


def _is_kept(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, list) and all(_is_int(i) for i in v) for v in value.values())


# key → (check, what the value must be).  Writers may add keys; these must be there and be right.
RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "arch": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "fingerprint": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "model_config_class": (_is_identifier, "the name of a ComfyUI model-config class"),
    "model_class": (_is_identifier, "the name of a ComfyUI model class"),
    "model_type": (_is_identifier, "the name of a ComfyUI ModelType"),
    "unet_config": (lambda v: isinstance(v, dict) and _is_json_config(v), "a JSON object (the model config)"),
    "sampling_settings": (lambda v: isinstance(v, dict) and _is_json_config(v), "a JSON object"),
    "kept": (_is_kept, "an object mapping each unit group to a list of integer unit indices"),
    "counts": (_is_counts, "an object mapping each unit group to its unit count (an integer >= 1)"),
    "silenced": (_is_str_list, "a list of unit-group names"),
}
# Optional keys: checked when present (other fields of newer writers are passed through unchecked).
def _is_float_dtype_name(value: Any) -> bool:
    if value is None:
        return True
    dtype = getattr(torch, value, None) if _is_identifier(value) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


# The dtypes ComfyUI computes in (its manual cast casts stored weights to one of these).
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def _is_fp8_name(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("float8_") and _is_float_dtype_name(value)


_DTYPE_OR_NULL = (_is_float_dtype_name, "null or the name of a floating-point torch dtype (e.g. \"float8_e4m3fn\")")
OPTIONAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "weight_dtype": _DTYPE_OR_NULL,
    "manual_cast_dtype": (lambda v: v is None or v in COMPUTE_DTYPES,
                          f"null or a compute dtype ({', '.join(COMPUTE_DTYPES)})"),
    "scaled_fp8": (lambda v: v is None or _is_fp8_name(v), "null or the name of a float8 torch dtype"),
    "fp8_optimizations": (lambda v: isinstance(v, bool), "true or false"),
    "tensor_dtypes": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_float_dtype_name(d)
                                                          for k, d in v.items()),
                      "an object of tensor names to floating-point dtype names"),
    "align": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ALIGN,
              f"the feature multiple the kept units were planned with, an integer in [1, {MAX_ALIGN}]"),
}


def check_pruned_record(record: Any, source: str) -> dict:
    """Check a pruning record's schema and inner consistency; returns it unchanged.

    Every key's type, the kept indices (integers, unique, within ``counts``), and the silenced
    groups.  ``source`` (the file name) starts every message.  Raises PrunedFileError.
    """
    if not isinstance(record, dict):
        raise PrunedFileError(f"{source}: the pruning record is a {type(record).__name__}, not a JSON object; "
                              "the file is damaged; save the pruned model again")
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
        raise PrunedFileError(f"{source}: the pruning record lacks {', '.join(repr(k) for k in missing)}; "
                              "the file is damaged or was not written by Save Pruned Model")
    for key, (ok, what) in {**RECORD_FIELDS, **{k: v for k, v in OPTIONAL_FIELDS.items() if k in record}}.items():
        if not ok(record[key]):
            raise PrunedFileError(f"{source}: record field '{key}' must be {what}, got {_show(record[key])}")
    # float8 layers compute through ComfyUI's manual cast (scaled-fp8 layers always cast themselves)
    if _is_fp8_name(record.get("weight_dtype")) and record.get("manual_cast_dtype") is None:
        raise PrunedFileError(f"{source}: the record stores weights in {record['weight_dtype']} but has no "
                              f"manual_cast_dtype; float8 weights are computed in one of {', '.join(COMPUTE_DTYPES)}; "
                              "the file is damaged: prune and save the model again")
    return check_kept_units(record, source)


def check_kept_units(record: dict, source: str) -> dict:
    """The unit part of a record (``kept``, ``counts``, ``silenced``, types already checked): kept
    indices unique and within ``counts``, silenced groups real and keeping one unit.  Returns the
    record; raises PrunedFileError."""
    counts, kept = record["counts"], record["kept"]
    if set(kept) != set(counts):
        odd = sorted(set(kept) ^ set(counts))
        raise PrunedFileError(f"{source}: record 'kept' and 'counts' name different unit groups (e.g. {odd[0]!r})")
    for name, indices in kept.items():
        bad = [i for i in indices if not 0 <= i < counts[name]]
        if bad:
            raise PrunedFileError(f"{source}: group {name!r} keeps unit {bad[0]}, outside 0..{counts[name] - 1}")
        if len(set(indices)) != len(indices):
            raise PrunedFileError(f"{source}: group {name!r} lists a kept unit more than once")
    for name in record["silenced"]:
        if name not in counts:
            raise PrunedFileError(f"{source}: record 'silenced' names {name!r}, which is not a unit group")
        if len(kept[name]) != 1:
            raise PrunedFileError(f"{source}: silenced group {name!r} must keep exactly one unit, "
                                  f"keeps {len(kept[name])}")
    return record


def check_record_layout(record: dict, layout: Layout, source: str) -> dict[str, torch.Tensor]:
    """The checked record against the layout rebuilt from its config; returns the keep masks.

    The layout fingerprint and every group's count must match what the record says.
    Raises PrunedFileError.
    """
    theirs = {g.name: g.count for g in layout.groups}
    if record["counts"] != theirs:
        odd = sorted(n for n in set(theirs) | set(record["counts"]) if theirs.get(n) != record["counts"].get(n))
        raise PrunedFileError(
            f"{source}: the record's unit counts do not match the model its config rebuilds "
            f"(group {odd[0]!r}: record {record['counts'].get(odd[0])}, model {theirs.get(odd[0])}); "
            "the file is damaged or the model code (ComfyUI, diffusers) changed")
    if layout.fingerprint() != record["fingerprint"]:
        raise PrunedFileError(f"{source}: the rebuilt base model does not match the saved layout "
                              "(the model code of ComfyUI or diffusers changed?)")
    keep = {g.name: torch.zeros(g.count, dtype=torch.bool) for g in layout.groups}
    for name, kept in record["kept"].items():
        keep[name][kept] = True
    return keep


def other_dtypes(module: nn.Module, state_dict: dict[str, torch.Tensor], weight_dtype: str) -> dict[str, str]:
    """The tensors of a pruned module that are not weight matrices and are stored in another floating-point
    dtype than ``weight_dtype`` (e.g. SD3's float32 ``pos_embed`` in a bf16 model), name → dtype name: the
    record declares them, so loading keeps exactly these dtypes and :func:`check_state_dict` accepts them."""
    params = dict(module.named_parameters())
    return {name: _dtype(t.dtype) for name, t in state_dict.items()
            if t.is_floating_point() and _dtype(t.dtype) != weight_dtype.removeprefix("torch.")
            and not (name in params and params[name].ndim >= 2)}


def check_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                     compute_dtype: torch.dtype | None = None, declared: dict[str, str] | None = None) -> None:
    """The file's tensors against the rebuilt (meta-device) pruned module: same names, same shapes,
    and the dtypes the record builds: every weight matrix (a parameter of >= 2 dims) in exactly the
    rebuilt module's dtype (the record's ``weight_dtype``, or ``scaled_fp8``); biases, norms, scales
    and buffers in that dtype too, or in float32 / ``compute_dtype`` when the record computes through
    a manual cast (mixed checkpoints keep such tensors in full precision).  ``compute_dtype`` is the
    record's ``manual_cast_dtype`` (None: weights compute in their own dtype).  ``declared``: the record's
    ``tensor_dtypes`` (see :func:`other_dtypes`), non-matrix tensors stored in exactly the declared dtype are
    accepted.  Raises PrunedFileError."""
    expected = module.state_dict(keep_vars=True)
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unexpected or missing:
        raise PrunedFileError(f"{source} does not fit the rebuilt model: unexpected {unexpected[:3]}, "
                              f"missing {missing[:3]}")
    loose = {torch.float32, compute_dtype} if compute_dtype is not None else set()
    for name, tensor in state_dict.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise PrunedFileError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the rebuilt model "
                                  f"needs {tuple(want.shape)}")
        if tensor.dtype == want.dtype:
            continue
        matrix = isinstance(want, nn.Parameter) and want.ndim >= 2
        if tensor.is_floating_point() and want.is_floating_point() and not matrix and (
                tensor.dtype in loose or (declared or {}).get(name) == _dtype(tensor.dtype)):
            continue
        raise PrunedFileError(
            f"{source}: tensor {name} is stored in {_dtype(tensor.dtype)}, but the record builds it in "
            f"{_dtype(want.dtype)}" + ("" if not tensor.is_floating_point() or not want.is_floating_point() else
                                       " (the weights' dtype and manual cast in the record disagree with the "
                                       "stored tensors)") + "; the file is damaged: prune and save the model again")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
