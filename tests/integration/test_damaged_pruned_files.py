"""Fuzzing Load Pruned Model on a real (tiny) ComfyUI pruned-model file: truncations, bit flips and
edited record metadata end either in a model that samples like the saved one or in an EcoDiffError
naming the file -- never another exception type, and nothing named in the file is called unless it
is a real ComfyUI model-config / model class."""
from __future__ import annotations

import json
import random
import struct

import pytest
import safetensors.torch
import torch

import comfy_tiny as ct
from comfy_checks import random_mask
from file_damage import header_end, truncations_and_bit_flips


@pytest.fixture(scope="module")
def saved(weights, pruned_files, nodes, tmp_path_factory):
    """A tiny SD1.5 pruned with a random mask, saved; its bytes and reference sample."""
    tiny = ct.tiny("sd15", seed=5)
    layout = weights.model_layout(tiny.model)
    state = random_mask(layout)
    with torch.inference_mode():
        pruned = nodes.ApplyPrunedMask.execute(tiny.model, state, "params", 0.2, "", "prune").args[0]
        path = pruned_files.save_pruned_model(pruned, tmp_path_factory.mktemp("pruned") / "good.safetensors")
        reference = ct.sample(pruned, tiny.positive, tiny.negative, seed=1, steps=2)
    return tiny, path.read_bytes(), reference


def _header(data: bytes) -> tuple[dict, bytes]:
    """The safetensors JSON header and the tensor bytes after it."""
    end = header_end(data)
    return json.loads(data[8:end]), data[end:]


def _with_record(good: bytes, tmp_path, edit) -> bytes:
    """``good`` with its record metadata replaced by ``edit(record)`` (or the text ``edit``)."""
    header, body = _header(good)
    record = json.loads(header["__metadata__"]["record"])
    new = edit(record) if callable(edit) else edit
    header["__metadata__"] = {**header["__metadata__"], "record": new if isinstance(new, str) else json.dumps(new)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _variants(good: bytes, tmp_path):
    rng = random.Random(7)
    end = header_end(good)
    yield from truncations_and_bit_flips(good, rng, (0, 5, 8, 100, end - 1, end, end + 7, len(good) - 1),
                                         random_cuts=6, flips=24, anywhere_every=4)
    record = json.loads(_header(good)[0]["__metadata__"]["record"])
    for key in record:
        yield f"without {key}", _with_record(good, tmp_path,
                                             lambda r, key=key: {k: v for k, v in r.items() if k != key})
        for value in (None, 1, "x", [], {}):
            yield f"{key}={value!r}", _with_record(good, tmp_path, lambda r, key=key, value=value: {**r, key: value})
    yield "record a list", _with_record(good, tmp_path, "[1, 2]")
    yield "record not json", _with_record(good, tmp_path, "{record")
    names = {
        "model_config_class": ["torch", "BASE", "os", "__class__", "supported_models_base", "SDXL", "models",
                               "Flux"],
        "model_class": ["torch", "ModelType", "BaseModel", "Flux", "__class__", "model_sampling"],
        "model_type": ["FLUX", "EPS ", "__class__"],
    }
    for key, values in names.items():
        for value in values:
            yield f"{key}={value}", _with_record(good, tmp_path, lambda r, key=key, value=value: {**r, key: value})
    cfg_keys = sorted(record["unet_config"])
    for key in rng.sample(cfg_keys, min(5, len(cfg_keys))):
        for value in (None, "x", -1, 0, [1], {"__dtype__": "float16"}):
            yield f"unet_config {key}={value!r}", _with_record(
                good, tmp_path, lambda r, key=key, value=value: {**r, "unet_config": {**r["unet_config"], key: value}})
    for key in sorted(record["sampling_settings"]):
        for value in (None, "x", -1.0, []):
            yield f"sampling {key}={value!r}", _with_record(
                good, tmp_path,
                lambda r, key=key, value=value: {**r, "sampling_settings": {**r["sampling_settings"], key: value}})
    group = sorted(record["counts"])[0]
    kept_edits = {"kept 999": [0, 999], "kept -1": [-1], "kept dup": [0, 0], "kept float": [0.0], "kept str": ["0"],
                  "kept none": [], "kept all": list(range(record["counts"][group]))}
    for label, value in kept_edits.items():
        yield label, _with_record(good, tmp_path, lambda r, value=value: {**r, "kept": {**r["kept"], group: value}})
    yield "count +1", _with_record(good, tmp_path,
                                   lambda r: {**r, "counts": {**r["counts"], group: r["counts"][group] + 1}})
    yield "extra keys", _with_record(good, tmp_path, lambda r: {**r, "note": [1], "future": {"x": 1}})
    yield "no align (older file)", _with_record(good, tmp_path,
                                                lambda r: {k: v for k, v in r.items() if k != "align"})
    for value in BAD_ALIGNS:
        yield f"align {value!r}", _with_record(good, tmp_path, lambda r, value=value: {**r, "align": value})
    yield from _dtype_variants(good, tmp_path)


#: values of the record's ``align`` (the feature multiple the kept units were planned with) it refuses
BAD_ALIGNS = (0, -8, 7.5, "8", True, None, 100000)


# precision fields and stored dtypes: the file is fp32 computed in fp32 (manual_cast_dtype null)
RECORD_DTYPES = {
    "weight_dtype float16": {"weight_dtype": "float16"},
    "weight_dtype bfloat16 cast float32": {"weight_dtype": "bfloat16", "manual_cast_dtype": "float32"},
    "weight_dtype float8 cast float32": {"weight_dtype": "float8_e4m3fn", "manual_cast_dtype": "float32"},
    "weight_dtype float8 no cast": {"weight_dtype": "float8_e4m3fn"},
    "manual_cast_dtype float8": {"manual_cast_dtype": "float8_e4m3fn"},
    "manual_cast_dtype float64": {"manual_cast_dtype": "float64"},
    "manual_cast_dtype int8": {"manual_cast_dtype": "int8"},
    "scaled_fp8 float16": {"scaled_fp8": "float16"},
    "scaled_fp8 float8 weights float32": {"scaled_fp8": "float8_e4m3fn", "manual_cast_dtype": "float32"},
    "manual_cast_dtype float32": {"manual_cast_dtype": "float32"},  # valid: fp32 weights computed in fp32
}


def _with_tensors(good: bytes, tmp_path, edit) -> bytes:
    """``good`` with its tensors replaced by ``edit(state_dict)`` (same metadata)."""
    header, _ = _header(good)
    path = tmp_path / "_edit.safetensors"
    safetensors.torch.save_file(edit(safetensors.torch.load(good)), str(path), metadata=header["__metadata__"])
    return path.read_bytes()


def _dtype_variants(good: bytes, tmp_path):
    for label, change in RECORD_DTYPES.items():
        yield label, _with_record(good, tmp_path, lambda r, change=change: {**r, **change})
    sd = safetensors.torch.load(good)
    matrix = next(k for k, v in sd.items() if v.ndim == 2)
    bias = next(k for k, v in sd.items() if v.ndim == 1)
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.int8):
        name = str(dtype).removeprefix("torch.")
        for label, key in (("matrix", matrix), ("bias", bias)):
            yield f"one {label} {name}", _with_tensors(good, tmp_path,
                                                       lambda sd, key=key, dtype=dtype: {**sd, key: sd[key].to(dtype)})
    yield "all tensors float16", _with_tensors(good, tmp_path, lambda sd: {k: v.half() for k, v in sd.items()})


def test_damaged_pruned_files_load_or_give_a_clear_error(saved, pruned_files, core, tmp_path):
    tiny, good, reference = saved
    path = tmp_path / "fuzz.safetensors"
    outcomes, loaded = {}, []
    import comfy.supported_models

    variants = dict(_variants(good, tmp_path))
    for label, data in variants.items():
        path.write_bytes(data)
        try:
            with torch.inference_mode():
                model = pruned_files.load_pruned_model(path)
        except core.errors.EcoDiffError as exc:
            assert path.name in str(exc), (label, str(exc))
            outcomes[label] = "error"
            continue
        outcomes[label] = "ok"
        assert isinstance(model.model.model_config, comfy.supported_models.supported_models_base.BASE), label
        if not label.startswith("bit flip"):
            loaded.append(label)
    # edits that keep the record valid load (and sample like the saved model); all others are refused
    assert "extra keys" in loaded and "no align (older file)" in loaded
    assert "kept 999" not in loaded and "model_config_class=torch" not in loaded
    # tensors in other dtypes than the record builds, and casts that are no compute dtype, are refused
    dtype_labels = [label for label, _ in _dtype_variants(good, tmp_path)]
    assert [label for label in dtype_labels if outcomes[label] == "ok"] == ["manual_cast_dtype float32"]
    for label in ("extra keys", "manual_cast_dtype float32"):
        path.write_bytes(variants[label])
        with torch.inference_mode():
            model = pruned_files.load_pruned_model(path)
            assert torch.equal(ct.sample(model, tiny.positive, tiny.negative, seed=1, steps=2), reference)
    refused = [label for label, outcome in outcomes.items() if outcome == "error"]
    assert all(label in refused for label in ("record a list", "record not json", "kept dup", "kept -1",
                                              "kept float", "count +1", "model_config_class=os",
                                              "model_class=ModelType", "model_type=EPS ",
                                              *(f"align {value!r}" for value in BAD_ALIGNS)))
    assert len(refused) > len(outcomes) // 2
