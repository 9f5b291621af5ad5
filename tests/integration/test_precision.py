"""Pruned models stored in low precision (fp16, bf16, fp8 e4m3fn / e5m2, scaled fp8, mixed dtypes)
and computed through ComfyUI's manual cast: Save Pruned Model -> Load Pruned Model rebuilds the same
layers, keeps every tensor's dtype on disk and samples exactly like the in-memory pruned model."""
from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

import comfy_tiny as ct
from comfy_checks import random_keep, rel_err

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# (weight dtype, manual cast dtype, scaled fp8, float32 1-D parameters)
PRECISIONS = {
    "fp32": (F32, None, None, False),
    "fp16-cast-fp32": (F16, F32, None, False),
    "bf16": (BF16, None, None, False),
    "bf16-cast-fp32": (BF16, F32, None, False),
    "fp8e4m3-cast-fp32": (E4M3, F32, None, False),
    "fp8e5m2-cast-fp32": (E5M2, F32, None, False),
    "fp8e4m3-cast-bf16": (E4M3, BF16, None, False),
    "fp8e4m3-fp32-norms": (E4M3, F32, None, True),
    "scaled-fp8e4m3": (BF16, F32, E4M3, False),
}
# every precision on FLUX (cheap); the UNets' conv/norm layers on the usual checkpoint precisions
CASES = [("flux", p) for p in PRECISIONS] + \
        [("sd15", p) for p in ("fp16-cast-fp32", "bf16", "fp8e4m3-cast-fp32", "scaled-fp8e4m3")] + \
        [("sdxl", "fp8e5m2-cast-fp32"), ("sd3", "fp8e4m3-cast-fp32"), ("sd3", "bf16")]  # SD3 keeps pos_embed in fp32


def build(arch: str, precision: str):
    weight, cast, scaled, fp32_1d = PRECISIONS[precision]
    model = ct.build_model_precision(arch, 1, weight, cast, scaled)
    for name, p in model.model.diffusion_model.named_parameters():
        if name.endswith("scale_weight"):  # scaled fp8: the matrices are stored divided by these
            p.data.fill_(0.75)
    if fp32_1d:  # fp8 matrices beside float32 norms and biases, as mixed checkpoints store them
        for p in model.model.diffusion_model.parameters():
            if p.ndim <= 1:
                p.data = p.data.float()
    return model


def prune(weights, pruned_models, model, seed: int = 4):
    layout = weights.model_layout(model)
    keep = random_keep(layout, seed=seed)
    pruned, _ = pruned_models.build_pruned_model(model, layout, keep,
                                                 {g.name: torch.zeros(g.count) for g in layout.groups})
    return pruned


def dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch,precision", CASES)
def test_reloaded_pruned_model_samples_like_the_in_memory_one(arch, precision, weights, pruned_models, pruned_files,
                                                             tmp_path):
    weight, cast, scaled, _ = PRECISIONS[precision]
    _, ctx, pooled = ct.dims(arch)
    pos, neg = ct.make_conditioning(arch, ctx, pooled, 10), ct.make_conditioning(arch, ctx, pooled, 11)
    with torch.inference_mode():
        model = build(arch, precision)
        pruned = prune(weights, pruned_models, model)
        path = pruned_files.save_pruned_model(pruned, tmp_path / f"{arch}_{precision}.safetensors")
        loaded = pruned_files.load_pruned_model(path)
        a = ct.sample(pruned, pos, neg, seed=3, steps=2)
        b = ct.sample(loaded, pos, neg, seed=3, steps=2)
        unpruned = ct.sample(model, pos, neg, seed=3, steps=2)

    assert torch.isfinite(a).all()
    assert torch.equal(a, b) or rel_err(b, a) <= 1e-6
    assert rel_err(a, unpruned) > 1e-4  # pruning did change the model
    # on disk and after reloading: every tensor in its own dtype (fp8 stays fp8, scales stay fp32)
    expected = dtypes(pruned.model.diffusion_model)
    assert {k: v.dtype for k, v in safetensors.torch.load_file(str(path)).items()} == expected
    assert dtypes(loaded.model.diffusion_model) == expected
    dm = pruned.model.diffusion_model
    matrices = {v for k, v in expected.items() if k.endswith("weight") and dm.get_parameter(k).ndim == 2}
    assert matrices == {scaled or weight}
    assert loaded.model.manual_cast_dtype == pruned.model.manual_cast_dtype == cast
    assert loaded.model.get_dtype() == pruned.model.get_dtype()
    record = weights.pruning_info(loaded)
    assert record["weight_dtype"] == str(weight).removeprefix("torch.")
    assert record["manual_cast_dtype"] == (None if cast is None else str(cast).removeprefix("torch."))
    assert record["scaled_fp8"] == (None if scaled is None else str(scaled).removeprefix("torch."))


def _without_precision_keys(path, out):
    """The file as the previous version wrote it: a record without the precision keys."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    sd = safetensors.torch.load_file(str(path))
    record = json.loads(meta["record"])
    for key in ("weight_dtype", "manual_cast_dtype", "scaled_fp8", "fp8_optimizations"):
        del record[key]
    meta["record"] = json.dumps(record)
    safetensors.torch.save_file(sd, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("arch,precision", [("flux", "fp8e4m3-cast-fp32"), ("flux", "fp16-cast-fp32"),
                                            ("flux", "fp32"), ("flux", "scaled-fp8e4m3"),
                                            ("sdxl", "fp8e4m3-cast-fp32")])
def test_records_without_precision_keys_still_load(arch, precision, weights, pruned_models, pruned_files, tmp_path):
    """Older records: weight dtype from the record's unet_config, manual cast as ComfyUI's loaders
    pick it for this device (on CPU: float32 for every low-precision dtype), scales found in the file."""
    import comfy.model_management as mm

    weight, cast, scaled, _ = PRECISIONS[precision]
    _, ctx, pooled = ct.dims(arch)
    pos, neg = ct.make_conditioning(arch, ctx, pooled, 10), ct.make_conditioning(arch, ctx, pooled, 11)
    with torch.inference_mode():
        pruned = prune(weights, pruned_models, build(arch, precision))
        path = pruned_files.save_pruned_model(pruned, tmp_path / "new.safetensors")
        loaded = pruned_files.load_pruned_model(_without_precision_keys(path, tmp_path / "old.safetensors"))
        expected_cast = mm.unet_manual_cast(weight, mm.get_torch_device())
        assert loaded.model.manual_cast_dtype == expected_cast
        assert dtypes(loaded.model.diffusion_model) == dtypes(pruned.model.diffusion_model)
        b = ct.sample(loaded, pos, neg, seed=3, steps=2)
        if expected_cast == cast:  # the device picks what the in-memory model used: identical samples
            assert torch.equal(ct.sample(pruned, pos, neg, seed=3, steps=2), b)
    assert torch.isfinite(b).all()


@pytest.mark.parametrize("key,value,message", [
    ("manual_cast_dtype", "int8", "'manual_cast_dtype' must be null or a compute dtype"),
    ("manual_cast_dtype", "float8_e4m3fn", "'manual_cast_dtype' must be null or a compute dtype"),
    ("manual_cast_dtype", "float64", "'manual_cast_dtype' must be null or a compute dtype"),
    ("scaled_fp8", "bfloat16", "'scaled_fp8' must be null or the name of a float8"),
    ("weight_dtype", "float16", "is stored in bfloat16, but the record builds it in float16"),
    ("weight_dtype", "float8_e4m3fn", "is stored in bfloat16, but the record builds it in float8_e4m3fn"),
])
def test_damaged_precision_key_is_a_clear_error(weights, pruned_models, pruned_files, core, tmp_path, key, value,
                                                message):
    """A bf16 file whose record names another weight dtype, or a cast that is no compute dtype:
    one PrunedFileError at load (not a raw error from sampling)."""
    with torch.inference_mode():
        pruned = prune(weights, pruned_models, build("sd15", "bf16-cast-fp32"))
    path = pruned_files.save_pruned_model(pruned, tmp_path / "p.safetensors")
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    record = json.loads(meta["record"])
    record[key] = value
    meta["record"] = json.dumps(record)
    safetensors.torch.save_file(safetensors.torch.load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(core.pruned_record.PrunedFileError, match=f"^p.safetensors: .*{message}"):
        pruned_files.load_pruned_model(path)


@pytest.mark.parametrize("arch,precision,compute", [("flux", "fp32", BF16), ("sd15", "fp32", BF16),
                                                    ("flux", "fp8e4m3-cast-fp32", BF16)])
def test_model_compute_dtype_carries_to_the_pruned_and_reloaded_model(arch, precision, compute, weights, pruned_models,
                                                                      pruned_files, tmp_path):
    """ComfyUI's ModelComputeDtype (``set_model_compute_dtype``: an object patch plus forced weight
    casting) is the pruned MODEL's compute dtype in memory and after reloading."""
    _, ctx, pooled = ct.dims(arch)
    pos, neg = ct.make_conditioning(arch, ctx, pooled, 10), ct.make_conditioning(arch, ctx, pooled, 11)
    with torch.inference_mode():
        model = build(arch, precision).clone()
        model.set_model_compute_dtype(compute)
        pruned = prune(weights, pruned_models, model)
        loaded = pruned_files.load_pruned_model(pruned_files.save_pruned_model(pruned, tmp_path / "p.safetensors"))
        a = ct.sample(pruned, pos, neg, seed=3, steps=2)
        b = ct.sample(loaded, pos, neg, seed=3, steps=2)
        unpruned = ct.sample(model, pos, neg, seed=3, steps=2)
    assert torch.isfinite(a).all() and rel_err(a, unpruned) > 1e-4
    assert torch.equal(a, b)
    assert loaded.model.manual_cast_dtype == compute
    assert weights.pruning_info(loaded)["manual_cast_dtype"] == str(compute).removeprefix("torch.")


@pytest.mark.parametrize("arch,precision", CASES)
def test_pruned_model_computes_what_hard_masking_computes(arch, precision, weights, soft_gates, pruned_models):
    """Slicing == hard masking in every storage precision: the pruned layers keep their host class,
    so manual cast and scaled-fp8 weight scales apply to what remains (modulation rows included)."""
    weight, cast, scaled, _ = PRECISIONS[precision]
    _, ctx, pooled = ct.dims(arch)
    pos, neg = ct.make_conditioning(arch, ctx, pooled, 10), ct.make_conditioning(arch, ctx, pooled, 11)
    with torch.inference_mode():
        model = build(arch, precision)
        layout = weights.model_layout(model)
        keep = random_keep(layout, seed=4)
        pruned, _ = pruned_models.build_pruned_model(model, layout, keep,
                                                     {g.name: torch.zeros(g.count) for g in layout.groups})
        a = ct.sample(pruned, pos, neg, seed=3, steps=2)
        b = ct.sample(soft_gates.soft_gated_model(model, layout, keep), pos, neg, seed=3, steps=2)
    compute = cast or weight
    assert rel_err(a, b) <= (1e-5 if compute == F32 else 2e-2)
