"""Replacement modules for pruned layers: owners whose units are all removed, and Linears that keep
only some output rows (``ScatterLinear``).

With every head gated to zero an attention module still adds its out-projection bias; the
replacement returns exactly that (the official code wrongly passes its input through instead).
Parameter names mirror the original (``to_out.0.bias``, ``to_add_out.bias``) so state dicts of
pruned models keep the original keys for what remains.

Only owners that fail or misbehave with zero units get a replacement:

- diffusers ``Attention`` computes ``head_dim = inner_dim // heads``: ZeroDivisionError at 0 heads.
- FLUX attention would run with zero heads on CPU SDPA, but fused attention kernels and other
  diffusers attention backends are not guaranteed to accept zero heads, so it is replaced too.
- ``FeedForward`` (GELU, GEGLU, SwiGLU) needs none: ``Linear(d, 0)`` → ``chunk`` → ``Linear(0, d)``
  returns the down-projection bias exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import EcoDiffError


class Bias(nn.Module):
    """Holds the bias that a fully pruned projection still adds; ``bias`` may be None."""

    def __init__(self, bias: torch.Tensor | None, features: int) -> None:
        super().__init__()
        self.features = features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def expand_to(self, like: torch.Tensor, shape: tuple[int, ...], channel_dim: int = -1) -> torch.Tensor:
        """A fresh (not expanded-view) tensor of ``shape`` filled with the bias along ``channel_dim``."""
        out = like.new_zeros(shape)
        if self.bias is None:
            return out
        view = [1] * len(shape)
        view[channel_dim] = self.features
        return out + self.bias.to(dtype=like.dtype).view(view)

    def extra_repr(self) -> str:
        return f"features={self.features}, bias={self.bias is not None}"


def _dropout_of(module_list: nn.ModuleList) -> nn.Module:
    return module_list[1] if len(module_list) > 1 else nn.Identity()


class EmptyAttention(nn.Module):
    """diffusers ``Attention`` with zero heads: out-projection bias (+ residual) / rescale factor."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if getattr(attn, "to_out", None) is None:
            raise EcoDiffError(f"cannot empty {type(attn).__name__}: it has no to_out projection")
        out = attn.to_out[0]
        self.out_dim = out.out_features
        self.to_out = nn.ModuleList([Bias(out.bias, out.out_features), _dropout_of(attn.to_out)])
        self.residual_connection = bool(getattr(attn, "residual_connection", False))
        self.rescale_output_factor = float(getattr(attn, "rescale_output_factor", 1.0))
        self.heads = 0

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if hidden_states.ndim == 4:  # (B, C, H, W) input, as the processors accept
            b, _, h, w = hidden_states.shape
            out = self.to_out[0].expand_to(hidden_states, (b, self.out_dim, h, w), channel_dim=1)
        else:
            out = self.to_out[0].expand_to(hidden_states, (*hidden_states.shape[:-1], self.out_dim))
        out = self.to_out[1](out)
        if self.residual_connection:
            out = out + hidden_states
        return out / self.rescale_output_factor

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, all heads pruned"


class EmptyFluxJointAttention(nn.Module):
    """FLUX double-block joint attention with zero heads: (to_out.0 bias, to_add_out bias)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        out, add_out = attn.to_out[0], attn.to_add_out
        self.to_out = nn.ModuleList([Bias(out.bias, out.out_features), _dropout_of(attn.to_out)])
        self.to_add_out = Bias(add_out.bias, add_out.out_features)
        self.heads = 0

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb=None, **kwargs):
        if encoder_hidden_states is None:
            raise EcoDiffError("pruned FLUX joint attention needs encoder_hidden_states, as the original did")
        img = self.to_out[0].expand_to(hidden_states, (*hidden_states.shape[:-1], self.to_out[0].features))
        txt = self.to_add_out.expand_to(
            encoder_hidden_states, (*encoder_hidden_states.shape[:-1], self.to_add_out.features))
        return self.to_out[1](img), txt

    def extra_repr(self) -> str:
        return "all heads pruned"


class EmptyPreOnlyAttention(nn.Module):
    """FLUX single-block attention (no out-projection) with zero heads: a (…, 0) feature tensor."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.heads = 0

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise EcoDiffError("pruned pre-only attention was called with encoder_hidden_states; "
                               "the original single-stream block never does this")
        return hidden_states.new_zeros((*hidden_states.shape[:-1], 0))

    def extra_repr(self) -> str:
        return "all heads pruned"


class ScatterLinear(nn.Module):
    """A Linear that computes only ``rows`` of its output and scatters them into zeros.

    Used where a gate sits on output rows (AdaLN modulation channels): parameters and FLOPs shrink,
    the output keeps its full width ``out_features``, so the consumer (chunk into shift/scale/gate)
    is unchanged.  A pruned Linear keeps its own class, with this class mixed in (``scatter_rows``):
    whatever the host's layer does with its weight (ComfyUI's manual cast, scaled fp8
    ``scale_weight``, patched weight functions) still happens; only the output is scattered.
    ``weight`` holds the kept rows, in the order of ``rows``.
    """

    rows: torch.Tensor

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = super().forward(x, *args, **kwargs)
        out = y.new_zeros((*y.shape[:-1], self.out_features))
        return out.index_copy(-1, self.rows.to(y.device), y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, computed_rows={self.rows.numel()}"


_SCATTER_CLASSES: dict[type, type] = {}


def scatter_rows(linear: nn.Linear, rows: torch.Tensor, out_features: int) -> nn.Linear:
    """Make ``linear`` (whose weight and bias already hold only ``rows``) a ScatterLinear of full
    width ``out_features``, in place: its class becomes ``ScatterLinear`` mixed into its own class,
    and ``rows`` a buffer (state-dict key ``<path>.rows``).  Returns ``linear``."""
    cls = type(linear)
    if not issubclass(cls, ScatterLinear):
        if cls not in _SCATTER_CLASSES:
            _SCATTER_CLASSES[cls] = type(f"Scatter{cls.__name__}", (ScatterLinear, cls), {"__module__": __name__})
        linear.__class__ = _SCATTER_CLASSES[cls]
    linear.register_buffer("rows", torch.as_tensor(rows, dtype=torch.long).clone())
    linear.in_features, linear.out_features = linear.weight.shape[1], int(out_features)
    return linear
