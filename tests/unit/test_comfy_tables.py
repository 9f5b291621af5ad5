"""ComfyUI architecture tables on stand-in modules with ComfyUI's class and attribute names
(no ComfyUI needed; the real classes are covered by tests/integration)."""
from __future__ import annotations

import torch
from torch import nn

from ecodiff_core.archs import find_layout
from ecodiff_core.plan import PruneTarget, plan_pruning
from ecodiff_core.prune import prune_model
from ecodiff_core.replacements import EmptyAttention

H, HD, DIM, MLP = 4, 8, 32, 64


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads, self.dim_head = H, HD
        self.to_q, self.to_k, self.to_v = (nn.Linear(DIM, H * HD, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(H * HD, DIM), nn.Dropout(0.0))


class GEGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, 2 * MLP)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(), nn.Dropout(0.0), nn.Linear(MLP, DIM))


class BasicTransformerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1, self.attn2, self.ff = CrossAttention(), CrossAttention(), FeedForward()
        self.n_heads, self.d_head = H, HD


class UNetModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Identity(), BasicTransformerBlock())])
        self.middle_block = nn.Sequential(BasicTransformerBlock())
        self.output_blocks = nn.ModuleList([nn.Sequential(BasicTransformerBlock())])


class Modulation(nn.Module):
    def __init__(self, mult: int) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, mult * DIM)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = H
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, MLP), nn.GELU(), nn.Linear(MLP, DIM))


class DoubleStreamBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.hidden_size = H, DIM
        self.img_mod, self.txt_mod = Modulation(6), Modulation(6)
        self.img_attn, self.txt_attn = SelfAttention(), SelfAttention()
        self.img_mlp, self.txt_mlp = _mlp(), _mlp()


class SingleStreamBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.hidden_size, self.mlp_hidden_dim = H, DIM, MLP
        self.linear1, self.linear2 = nn.Linear(DIM, 3 * DIM + MLP), nn.Linear(DIM + MLP, DIM)
        self.modulation = Modulation(3)


class Flux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock()])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(), SingleStreamBlock()])


class MMSelfAttention(nn.Module):
    def __init__(self, pre_only: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = H, HD
        self.qkv = nn.Linear(DIM, 3 * DIM)
        if not pre_only:
            self.proj = nn.Linear(DIM, DIM)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, MLP), nn.Linear(MLP, DIM)


class DismantledBlock(nn.Module):
    def __init__(self, pre_only: bool = False) -> None:
        super().__init__()
        self.pre_only, self.x_block_self_attn = pre_only, False
        self.attn = MMSelfAttention(pre_only)
        if not pre_only:
            self.mlp = Mlp()


class JointBlock(nn.Module):
    def __init__(self, pre_only: bool) -> None:
        super().__init__()
        self.context_block, self.x_block = DismantledBlock(pre_only), DismantledBlock()


class MMDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.joint_blocks = nn.ModuleList([JointBlock(False), JointBlock(True)])


def _keep(layout, fill: bool = True) -> dict[str, torch.Tensor]:
    return {g.name: torch.full((g.count,), fill, dtype=torch.bool) for g in layout.groups}


def test_unet_table_finds_heads_and_geglu_neurons():
    layout = find_layout(UNetModel())
    assert layout.arch == "comfy_unet"
    assert layout.total_units("head") == 6 * H and layout.total_units("neuron") == 3 * MLP
    ff = layout.by_name()["input_blocks.0.1.ff:neurons"]
    assert [s.offset for s in ff.producers] == [0, MLP]
    assert layout.by_name()["middle_block.0.attn1:heads"].block == "middle_block"


def test_unet_pruning_updates_heads_and_empties_attention():
    model = UNetModel()
    layout = find_layout(model)
    keep = _keep(layout)
    keep["input_blocks.0.1.attn1:heads"][1:] = False
    keep["input_blocks.0.1.attn2:heads"][:] = False
    pruned = prune_model(model, layout, keep)
    attn = pruned.input_blocks[0][1].attn1
    assert attn.heads == 1 and attn.to_q.out_features == HD and attn.to_out[0].in_features == HD
    assert pruned.input_blocks[0][1].n_heads == 1  # what the block hands to attention patches
    assert pruned.middle_block[0].n_heads == H
    assert isinstance(pruned.input_blocks[0][1].attn2, EmptyAttention)


def test_flux_table_layout_and_split_sizes():
    model = Flux()
    layout = find_layout(model)
    assert layout.arch == "comfy_flux"
    assert set(layout.kinds()) == {"head", "neuron", "channel"}
    heads = layout.by_name()["double_blocks.0:heads"]
    assert [(s.module.split(".")[-2], s.offset, s.role) for s in heads.producers][:3] == \
        [("img_attn", 0, "q"), ("img_attn", DIM, "k"), ("img_attn", 2 * DIM, "v")]
    keep = _keep(layout)
    keep["single_blocks.0:heads"][:2] = False
    keep["single_blocks.0:neurons"][:10] = False
    keep["double_blocks.0:heads"][3] = False
    pruned = prune_model(model, layout, keep)
    single, double = pruned.single_blocks[0], pruned.double_blocks[0]
    assert (single.num_heads, single.hidden_size, single.mlp_hidden_dim) == (2, 2 * HD, MLP - 10)
    assert single.linear1.out_features == 3 * 2 * HD + MLP - 10
    assert (double.num_heads, double.img_attn.num_heads, double.txt_attn.num_heads) == (3, 3, 3)
    assert double.txt_attn.qkv.out_features == 9 * HD


def test_mmdit_table_shares_heads_and_skips_pre_only_parts():
    layout = find_layout(MMDiT())
    assert layout.arch == "comfy_mmdit"
    last = layout.by_name()["joint_blocks.1:heads"]
    assert [s.module for s in last.gates] == ["joint_blocks.1.x_block.attn.proj"]
    assert len(last.producers) == 6
    assert "joint_blocks.1.context_block.mlp:neurons" not in layout.by_name()
    assert "joint_blocks.0.context_block.mlp:neurons" in layout.by_name()


def test_inline_attention_groups_never_lose_their_last_head():
    model = Flux()
    layout = find_layout(model)
    assert {g.name: g.min_keep for g in layout.groups if g.min_keep} == \
        {g.name: 1 for g in layout.groups if g.kind == "head"}
    logits = {g.name: torch.randn(g.count, generator=torch.Generator().manual_seed(0)) for g in layout.groups}
    short = plan_pruning(model, layout, logits, PruneTarget(keep_ratios={"head": 0.05}))  # asks 1 of 12 heads
    assert short.notes == ["keep_ratios head=0.05 keeps 3 of the 12 heads of 'comfy_flux', not 1: 3 blocks cannot "
                           "run without their last heads (the smallest head ratio kept exactly is 0.209)"]
    plan = plan_pruning(model, layout, logits, PruneTarget(keep_ratios={"head": 0.209}))  # 3 of 12
    assert not plan.notes and all(short.keep[n].equal(k) for n, k in plan.keep.items())
    for g in layout.groups:
        if g.kind == "head":  # the planner keeps exactly the best head
            assert plan.keep[g.name].tolist() == (logits[g.name] == logits[g.name].max()).tolist()


def test_closed_inline_attention_keeps_one_silenced_head():
    model = Flux()
    layout = find_layout(model)
    keep = _keep(layout)
    keep["double_blocks.0:heads"][:] = False
    scores = {g.name: torch.zeros(g.count) for g in layout.groups}
    scores["double_blocks.0:heads"][2] = 1.0
    pruned = prune_model(model, layout, keep, scores)
    block, orig = pruned.double_blocks[0], model.double_blocks[0]
    assert block.num_heads == block.img_attn.num_heads == block.txt_attn.num_heads == 1
    assert torch.equal(block.img_attn.qkv.weight[:HD], orig.img_attn.qkv.weight[2 * HD:3 * HD])  # head 2 stays
    assert torch.count_nonzero(block.img_attn.proj.weight) == 0 and torch.count_nonzero(block.txt_attn.proj.weight) == 0
    assert torch.equal(block.img_attn.proj.bias, orig.img_attn.proj.bias)
