"""Block checkpointing on ComfyUI's own SD1.5 / SDXL / FLUX / SD3 classes: the λ gradient of a
T = 3 trajectory (CFG on and off) equals plain autograd, through ComfyUI's guider and in-place adds."""
from __future__ import annotations

import pytest
import torch

import comfy_tiny as ct
from scripts.comfy_env import sub

BLOCKS = {"sd15": {"ResBlock", "BasicTransformerBlock"}, "sdxl": {"ResBlock", "BasicTransformerBlock"},
          "flux": {"DoubleStreamBlock", "SingleStreamBlock"}, "sd3": {"JointBlock"}}


def lambda_gradient(weights, sampling, tiny, cfg: float, blocks: bool):
    core = sub("ecodiff_core")
    archs, gates, gating = sub("ecodiff_core.archs"), sub("ecodiff_core.hard_concrete"), sub("ecodiff_core.gate_hooks")
    trajectory, block_checkpoint = sub("ecodiff_core.trajectory"), sub("ecodiff_core.block_checkpoint")
    assert core is not None
    layout = weights.model_layout(tiny.model)
    spec = sampling.SamplingSpec(width=32, height=32, steps=3, cfg=cfg, seed=4)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(gr.count, generator=g) + 1.0 for gr in layout.groups]
    sizes = [gr.count for gr in layout.groups]

    def body(session):
        controller = gating.GateController(session.module, layout)
        params = [lam.to(session.device).requires_grad_(True) for lam in logits]
        paths = archs.checkpoint_block_paths(session.module, layout.arch) if blocks else []

        def before_step(i):
            u = gates.uniform_noise(sum(sizes), torch.Generator().manual_seed(100 + i))
            controller.set({gr.name: gates.sample_gate(lam, part.to(lam.device), gates.GateSettings())
                            for gr, lam, part in zip(layout.groups, params, torch.split(u, sizes), strict=True)})

        s = session.samples[0]
        target = torch.zeros_like(s.noise)
        with controller.installed():
            result = trajectory.trajectory_gradient(
                s.denoise, s.noise, session.sigmas, target, params, before_step, checkpointing=True,
                grad_context=sampling.grad_context,
                step_context=lambda: block_checkpoint.checkpointed_blocks(session.module, paths, controller))
        types = {type(session.module.get_submodule(p)).__name__ for p in paths}
        return result, types

    with torch.inference_mode(False):
        return sampling.run_with_denoisers(tiny.model, [(tiny.positive, tiny.negative)], spec, body)


@pytest.mark.parametrize("arch", ct.ARCHS)
@pytest.mark.parametrize("cfg", [1.0, 2.5], ids=["nocfg", "cfg"])
def test_block_checkpointed_gradient_equals_autograd_on_comfy_classes(arch, cfg, weights, sampling):
    tiny = ct.tiny(arch, seed=5)
    (plain, none), (blocked, types) = (lambda_gradient(weights, sampling, tiny, cfg, False),
                                       lambda_gradient(weights, sampling, tiny, cfg, True))
    assert not none and types == BLOCKS[arch]
    a = torch.cat([t.flatten() for t in blocked.grads])
    b = torch.cat([t.flatten() for t in plain.grads])
    assert b.norm() > 0
    assert blocked.loss == pytest.approx(plain.loss, rel=1e-6)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5  # float32
    assert not any("forward" in m.__dict__ for m in weights.diffusion_module(tiny.model).modules())
