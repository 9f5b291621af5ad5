"""Learning reads the MODEL's weights without copying them: autograd may not save ComfyUI's
inference-tensor weights, and the module holds non-inference views of the same storage while
learning (``weights.plain_tensors``), so a learning forward copies no more weight bytes than
ComfyUI's own sampling forward does (none in the weights' own dtype; the manual cast's per-use
casts where the weights are stored in low precision)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import comfy_tiny as ct

aten = torch.ops.aten
COPIES = {aten.clone, aten._to_copy, aten.to, aten.copy_}  # ``to`` reaches modes whole in inference mode


class WeightCopies(TorchDispatchMode):
    """Bytes written by clone / to / copy_ from one of ``tensors``' storages into another storage."""

    def __init__(self, tensors) -> None:
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in COPIES:
            source = args[1] if func.overloadpacket is aten.copy_ else args[0]
            ptr = source.untyped_storage().data_ptr()
            if ptr in self.storages and out.untyped_storage().data_ptr() != ptr:
                self.bytes += out.numel() * out.element_size()
        return out


def copied_per_forward(model, run) -> tuple[float, int]:
    """(weight bytes copied per denoiser forward, forwards) while ``run()`` runs."""
    module = model.model.diffusion_model
    forwards = []
    hook = module.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with WeightCopies(list(module.parameters()) + list(module.buffers())) as counter:
            run()
    finally:
        hook.remove()
    assert forwards
    return counter.bytes / len(forwards), len(forwards)


@pytest.mark.parametrize("arch,dtype,cast", [("sd15", torch.float32, None), ("flux", torch.float32, None),
                                             ("flux", torch.float8_e4m3fn, torch.float32),
                                             ("sd15", torch.float16, torch.float32)])
def test_a_learning_forward_copies_no_more_weight_bytes_than_sampling(arch, dtype, cast, sampling, learning, core):
    spec = sampling.SamplingSpec(width=64, height=64, steps=2, cfg=2.0, seed=1)
    settings = core.learn.LearnSettings(epochs=1, accumulate=1, beta=0.1,
                                        lr={"head": 0.5, "neuron": 0.5, "channel": 0.5})
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        model = ct.build_model_precision(arch, 3, dtype, cast)
        _, context_dim, pooled_dim = ct.dims(arch)
        pos, neg = (ct.make_conditioning(arch, context_dim, pooled_dim, seed=s) for s in (1, 2))
        sampled, _ = copied_per_forward(model, lambda: ct.sample(model, pos, neg, seed=2, steps=2))
        state: list = []
        learned, forwards = copied_per_forward(
            model, lambda: state.append(learning.learn_mask(model, [(pos, neg)], spec, settings)))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    assert forwards >= 2 * spec.steps  # CFG and the recomputed steps did run
    assert learned <= sampled, f"a learning forward copies {learned:.0f} weight bytes, sampling {sampled:.0f}"
    if cast is None:
        assert learned == 0
    else:  # the manual cast's per-use casts are still counted: the counter sees weight copies
        assert sampled >= weight_bytes // 2
    assert any(v.abs().sum() > 0 for v in state[0].logits.values())  # it did learn
