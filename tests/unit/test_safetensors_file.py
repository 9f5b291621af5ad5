"""The engine's one safetensors reader/writer, the JSON form of model configs, and gate_scales (the
soft-gate weights the ComfyUI preview applies) against the gate hooks."""
import copy
import struct

import pytest
import torch

from ecodiff_core.archs import find_layout
from ecodiff_core.errors import EcoDiffError, MaskFileError
from ecodiff_core.gate_hooks import gate_scales, hard_gates
from ecodiff_core.pruned_record import PrunedFileError, _is_json_config, config_from_json, config_to_json
from ecodiff_core.safetensors_file import check_format, read, write_atomic
from ecodiff_core.units import get_linear
from tiny_models import MODEL_NAMES, build, run

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b/c": torch.tensor([1, 2], dtype=torch.int64)}
META = {"format": "ecodiff-test", "format_version": "1", "note": "ü"}


def test_write_then_read_gives_the_same_tensors_and_metadata(tmp_path):
    path = write_atomic(tmp_path / "sub" / "f.safetensors", TENSORS, META)
    assert path == tmp_path / "sub" / "f.safetensors" and not path.with_name("f.safetensors.tmp").exists()
    tensors, meta = read(path)
    assert meta == META and set(tensors) == set(TENSORS)
    for k, t in TENSORS.items():
        assert tensors[k].dtype == t.dtype and torch.equal(tensors[k], t)


def _damaged(good: bytes) -> dict[str, bytes]:
    return {"truncated": good[: len(good) // 2], "empty": b"",
            "header length 2^62": struct.pack("<Q", 1 << 62) + good[8:],
            "not safetensors": b"just some text, no header"}


@pytest.mark.parametrize("error", [EcoDiffError, MaskFileError, PrunedFileError])
@pytest.mark.parametrize("damage", ["truncated", "empty", "header length 2^62", "not safetensors"])
def test_a_damaged_file_is_the_callers_error_naming_the_file(tmp_path, error, damage):
    good = write_atomic(tmp_path / "good.safetensors", TENSORS, META).read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_damaged(good)[damage])
    with pytest.raises(error, match="bad.safetensors is not a readable thing \\(truncated or corrupted\\?\\)") as exc:
        read(path, error, "thing")
    assert type(exc.value) is error


@pytest.mark.parametrize("meta, message", [
    ({}, "f is not an EcoDiff test file \\(metadata 'format' is None\\); see the docs"),
    ({"format": "other", "format_version": "1"}, "f is not an EcoDiff test file \\(metadata 'format' is 'other'\\)"),
    ({"format": "ecodiff-test"},
     "f is an EcoDiff test file of format version None; this version of EcoDiff reads version 1"),
    ({"format": "ecodiff-test", "format_version": "2"}, "format version '2'; this version of EcoDiff reads version 1"),
])
def test_format_and_version_are_checked(meta, message):
    with pytest.raises(MaskFileError, match=message):
        check_format(meta, "f", "ecodiff-test", 1, "an EcoDiff test file", MaskFileError, hint="; see the docs")
    check_format({"format": "ecodiff-test", "format_version": "1"}, "f", "ecodiff-test", 1, "x", MaskFileError)


class _Odd:
    def __str__(self) -> str:
        return "odd"


@pytest.mark.parametrize("config, stored", [
    ({"dtype": torch.float8_e4m3fn, "n": 2}, {"dtype": {"__dtype__": "float8_e4m3fn"}, "n": 2}),
    ({"depth": (1, 2, [3, torch.bfloat16])}, {"depth": [1, 2, [3, {"__dtype__": "bfloat16"}]]}),
    ({1: None, "x": 0.5, "y": True, "z": _Odd()}, {"1": None, "x": 0.5, "y": True, "z": "odd"}),
])
def test_configs_round_trip_through_json(config, stored):
    assert config_to_json(config) == stored and _is_json_config(stored)
    back = config_from_json(stored)
    assert back == config_from_json(config_to_json(back))
    dtypes = [v for v in torch.utils._pytree.tree_leaves(back) if isinstance(v, torch.dtype)]
    assert dtypes == [v for v in torch.utils._pytree.tree_leaves(config) if isinstance(v, torch.dtype)]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gate_scales_as_weights_compute_what_the_gate_hooks_compute(name):
    model, inputs = build(name)
    layout = find_layout(model)
    gen = torch.Generator().manual_seed(3)
    keep = {g.name: torch.rand(g.count, generator=gen) > 0.4 for g in layout.groups}
    with hard_gates(model, layout, keep):
        expected = run(model, inputs)
    scaled = copy.deepcopy(model)
    scales = gate_scales(model, layout, keep)
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in scales.values())
    with torch.no_grad():
        for (path, side), scale in scales.items():
            lin = get_linear(scaled, path)
            scale = scale.to(lin.weight.dtype)
            lin.weight.mul_(scale[None, :] if side == "in" else scale[:, None])
            if side == "out" and lin.bias is not None:
                lin.bias.mul_(scale)
    torch.testing.assert_close(run(scaled, inputs), expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(run(model, inputs), expected)  # the keep mask does remove something
