"""Architecture tables: the registry finds the expected unit groups, and rejects what it cannot prune."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from ecodiff_core.archs import TABLES, find_layout, supported_architectures, validate_layout
from ecodiff_core.errors import EcoDiffError, UnsupportedArchitectureError
from ecodiff_core.units import Layout, Slice, UnitGroup
from tiny_models import TABLE_MODEL_NAMES, build


@functools.cache
def model_and_layout(name: str):
    model, _ = build(name)
    return model, find_layout(model)


# Hand-counted from the tiny configs in tiny_models.py.
EXPECTED = {
    # 7 transformer blocks (down 1+1, mid 1, up 2+2), 2 heads per attention, FFN inner = 4 × channels
    "sd15": {"arch": "diffusers_unet", "groups": 21, "head": 28, "neuron": 64 + 128 + 128 + 2 * 128 + 2 * 64},
    # 11 blocks: 3 at 16 ch (down 1, up 2; 2 heads), 8 at 32 ch (down 1×2, mid 2, up 2×2; 4 heads)
    "sdxl": {"arch": "diffusers_unet", "groups": 33, "head": 3 * 2 * 2 + 8 * 2 * 4, "neuron": 3 * 64 + 8 * 128},
    # 2 double blocks: 3 heads, ff+ff_context 2×96 neurons, 2×144 channels; 2 single: 3 heads, 96 neurons, 72 ch
    "flux": {"arch": "diffusers_flux", "groups": 16, "head": 4 * 3, "neuron": 2 * 2 * 96 + 2 * 96,
                 "channel": 2 * 2 * 144 + 2 * 72},
    # 3 joint blocks of 3 heads (+ attn2 in block 0); ff 96 neurons each, ff_context in blocks 0-1 (2 is pre-only)
    "sd3": {"arch": "diffusers_sd3", "groups": 9, "head": 4 * 3, "neuron": 5 * 96},
}


@pytest.mark.parametrize("name", TABLE_MODEL_NAMES)
def test_find_layout_counts(name: str) -> None:
    _, layout = model_and_layout(name)
    exp = EXPECTED[name]
    assert layout.arch == exp["arch"]
    assert len(layout.groups) == exp["groups"]
    for kind in ("head", "neuron", "channel"):
        assert layout.total_units(kind) == exp.get(kind, 0), kind


def test_unet_groups_describe_attention_and_geglu() -> None:
    _model, layout = model_and_layout("sd15")
    groups = layout.by_name()
    attn2 = groups["down_blocks.0.attentions.0.transformer_blocks.0.attn2:heads"]
    assert attn2.kind == "head" and attn2.width == 8 and attn2.block == "down_blocks.0"
    assert [s.role for s in attn2.producers] == ["q", "k", "v"]
    assert attn2.gates == (Slice("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0", "in"),)
    ff = groups["mid_block.attentions.0.transformer_blocks.0.ff:neurons"]
    assert ff.block == "mid_block"
    assert [s.offset for s in ff.producers] == [0, 128]  # GEGLU value and gate halves


def test_flux_groups_share_heads_across_streams_and_split_proj_out() -> None:
    _, layout = model_and_layout("flux")
    groups = layout.by_name()
    joint = groups["transformer_blocks.1.attn:heads"]
    assert {s.module.rsplit(".", 1)[-1] for s in joint.producers} == {
        "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
    assert len(joint.gates) == 2
    single_heads = groups["single_transformer_blocks.0.attn:heads"]
    mlp = groups["single_transformer_blocks.0.proj_mlp:neurons"]
    assert single_heads.gates[0].module == mlp.gates[0].module == "single_transformer_blocks.0.proj_out"
    assert (single_heads.gates[0].offset, mlp.gates[0].offset) == (0, 24)
    mod = groups["single_transformer_blocks.0.norm.linear:channels"]
    assert mod.gates == (Slice("single_transformer_blocks.0.norm.linear", "out"),) and mod.width == 1


def test_group_names_are_unique_and_stable() -> None:
    _, a = model_and_layout("sdxl")
    b = find_layout(build("sdxl")[0])
    assert [g.name for g in a.groups] == [g.name for g in b.groups]
    assert a.fingerprint() == b.fingerprint()


class NotADiffusionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)


def test_unsupported_model_lists_supported_architectures() -> None:
    with pytest.raises(UnsupportedArchitectureError) as err:
        find_layout(NotADiffusionModel())
    message = str(err.value)
    assert "NotADiffusionModel" in message
    for table in TABLES:
        assert table.ARCH_ID in message
    assert isinstance(err.value, EcoDiffError) and isinstance(err.value, ValueError)
    assert len(supported_architectures()) == len(TABLES)


def test_fused_qkv_is_rejected_with_a_fix() -> None:
    model, _ = build("flux")
    model.fuse_qkv_projections()
    with pytest.raises(EcoDiffError, match="unfuse_qkv_projections"):
        find_layout(model)


def _toy_layout(*groups: UnitGroup) -> Layout:
    return Layout(arch="toy", groups=groups)


def test_validate_layout_rejects_overlap_and_overflow() -> None:
    model = NotADiffusionModel()
    a = UnitGroup("a", "neuron", 3, 1, "lin", gates=(Slice("lin", "in"),))
    b = UnitGroup("b", "neuron", 2, 1, "lin", gates=(Slice("lin", "in", offset=2),))
    with pytest.raises(EcoDiffError, match="claimed by both"):
        validate_layout(model, _toy_layout(a, b))
    c = UnitGroup("c", "head", 3, 2, "lin", gates=(Slice("lin", "in"),))
    with pytest.raises(EcoDiffError, match="exceeds"):
        validate_layout(model, _toy_layout(c))
    validate_layout(model, _toy_layout(UnitGroup("d", "neuron", 4, 1, "lin", gates=(Slice("lin", "in"),))))
    assert torch.is_tensor(model.lin.weight)
