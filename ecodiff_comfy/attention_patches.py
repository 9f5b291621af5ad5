"""Attention patches on pruned UNets: every patch sees the head count of the attention it patches.

ComfyUI's ``BasicTransformerBlock`` hands ONE head count, its ``n_heads`` attribute, in
``extra_options["n_heads"]`` to the patches of both of its attentions (``attn1_patch``, the
``attn1`` replace patch, ``attn1_output_patch`` and the same for attn2): Self-Attention Guidance,
IP-Adapter-style nodes and others reshape q/k/v with it.  The engine's table keeps ``n_heads`` equal
to attn1's kept heads, but attn1 and attn2 are pruned independently.  A forward pre-hook on each
pruned block hands every patch the head count of the attention it patches.

A replace patch on an attention that lost every head cannot run (q/k/v have no features and the
attention is replaced by its output bias); it is refused with an ``EcoDiffError`` naming the node
that added the patch and the block.  Patches that only transform the attention's input or output
(``attn*_patch``, ``attn*_output_patch``) run as usual.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..ecodiff_core.errors import EcoDiffError

# attention → (patches before it, patches after it); ComfyUI 0.3.64 BasicTransformerBlock.forward
ATTENTIONS: dict[str, tuple[str, str]] = {"attn1": ("attn1_patch", "attn1_output_patch"),
                                          "attn2": ("attn2_patch", "attn2_output_patch")}


class _WithHeads:
    """A patch called with ``extra_options["n_heads"]`` set to ``heads`` (restored afterwards, the
    dict is shared by all patches of the block)."""

    def __init__(self, patch: Callable, heads: int) -> None:
        self.patch, self.heads = patch, heads

    def __call__(self, *args: Any) -> Any:
        extra = args[-1]
        old = extra.get("n_heads")
        extra["n_heads"] = self.heads
        try:
            return self.patch(*args)
        finally:
            extra["n_heads"] = old


def patch_owner(patch: Any) -> str:
    """A readable name of whoever made ``patch``: its qualified name, whose first part is the node
    class for patches defined inside a node's ``execute`` (e.g. SelfAttentionGuidance)."""
    name = getattr(patch, "__qualname__", None) or type(patch).__qualname__
    module = getattr(patch, "__module__", None) or type(patch).__module__
    owner = name.split(".<locals>")[0].split(".")[0]
    return f"'{owner}' ({module}.{name})"


def _replace_key(table: dict, options: dict) -> Any:
    """The key of ``table`` that ComfyUI's block uses for this call, or None."""
    block = options.get("block")
    if block is None:
        return None
    full = (block[0], block[1], options.get("block_index", 0))
    return full if full in table else block if block in table else None


class PatchHeads:
    """Forward pre-hook of one pruned ``BasicTransformerBlock`` at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = "transformer_options" not in kwargs and len(args) > 2
        options = args[2] if positional else kwargs.get("transformer_options")
        if not options:
            return None
        patches, replace = options.get("patches", {}), options.get("patches_replace", {})
        if not any(k in patches for pair in ATTENTIONS.values() for k in pair) and \
                not any(replace.get(a) for a in ATTENTIONS):
            return None
        patches, replace = dict(patches), dict(replace)
        for name, pair in ATTENTIONS.items():
            attn = getattr(block, name, None)
            if attn is None:
                continue
            heads = int(attn.heads)
            for key in pair:
                if key in patches:
                    patches[key] = [_WithHeads(p, heads) for p in patches[key]]
            table = replace.get(name)
            if table:
                hit = _replace_key(table, options)
                if hit is not None and heads == 0:
                    raise EcoDiffError(
                        f"{patch_owner(table[hit])} replaces the {name} attention of '{self.path}' (block {hit}), "
                        "but EcoDiff pruned every head of that attention, so it has no queries, keys or values "
                        "to attend with. Apply the mask with a lower sparsity (or a higher head keep ratio) so "
                        "this attention keeps a head, or do not use that node on this pruned model.")
                replace[name] = {k: _WithHeads(p, heads) for k, p in table.items()}
        options = {**options, "patches": patches, "patches_replace": replace}
        if positional:
            return (*args[:2], options, *args[3:]), kwargs
        return args, {**kwargs, "transformer_options": options}


def fit_attention_patches(module: nn.Module) -> int:
    """Give every ``BasicTransformerBlock`` of a pruned denoiser whose attentions no longer match its
    ``n_heads`` (pruned apart, or emptied) the ``PatchHeads`` hook; returns how many got one."""
    fitted = 0
    for path, block in module.named_modules():
        if type(block).__name__ != "BasicTransformerBlock" or not hasattr(block, "n_heads"):
            continue
        heads = [int(getattr(block, a).heads) for a in ATTENTIONS if getattr(block, a, None) is not None]
        if all(h == block.n_heads for h in heads) and 0 not in heads:
            continue
        if not any(isinstance(h, PatchHeads) for h in block._forward_pre_hooks.values()):
            block.register_forward_pre_hook(PatchHeads(path), with_kwargs=True)
            fitted += 1
    return fitted
