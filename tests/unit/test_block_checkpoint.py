"""Activation checkpointing per block inside the recomputed step: same gradient, fewer saved bytes."""
import pytest
import torch

from ecodiff_core.archs import checkpoint_block_paths
from ecodiff_core.block_checkpoint import checkpointed_blocks
from ecodiff_core.errors import SettingsError
from ecodiff_core.gate_hooks import GateController
from ecodiff_core.learn import LearnSettings, MaskLearner, use_block_checkpointing
from ecodiff_core.trajectory import trajectory_gradient
from test_learning import FAST, flat, gate_replayer, make_problem, random_logits, samples_for
from tiny_models import MODEL_NAMES

BLOCK_CLASSES = {"sd15": {"ResnetBlock2D", "BasicTransformerBlock"}, "sdxl": {"ResnetBlock2D", "BasicTransformerBlock"},
                 "flux": {"FluxTransformerBlock", "FluxSingleTransformerBlock"}}


def block_gradients(name, steps, cfg, blocks, checkpointing=True):
    model, layout, denoise, noise, sigmas = make_problem(name, steps, cfg)
    logits = random_logits(layout, torch.float64)
    target = torch.randn_like(noise, generator=torch.Generator().manual_seed(7))
    controller = GateController(model, layout)
    paths = checkpoint_block_paths(model, layout.arch) if blocks else []
    with controller.installed():
        result = trajectory_gradient(denoise, noise, sigmas, target, list(logits.values()),
                                     gate_replayer(controller, layout, logits), checkpointing=checkpointing,
                                     step_context=lambda: checkpointed_blocks(model, paths, controller))
    return result, paths


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_table_names_the_blocks_to_wrap(name):
    model, layout, *_ = make_problem(name, 1, False)
    paths = checkpoint_block_paths(model, layout.arch)
    classes = {type(model.get_submodule(p)).__name__ for p in paths}
    assert classes == BLOCK_CLASSES[name]
    assert all(not a.startswith(b + ".") for a in paths for b in paths)  # outermost only
    expected = sum(1 for _, m in model.named_modules() if type(m).__name__ in BLOCK_CLASSES[name])
    assert len(paths) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["steps", "graph"])
def test_block_checkpointed_gradient_equals_autograd(name, cfg, checkpointing):
    plain, _ = block_gradients(name, 3, cfg, blocks=False, checkpointing=False)
    blocked, paths = block_gradients(name, 3, cfg, blocks=True, checkpointing=checkpointing)
    assert paths
    a, b = flat(blocked.grads), flat(plain.grads)
    assert b.norm() > 0
    assert blocked.loss == pytest.approx(plain.loss, rel=1e-12)
    assert ((a - b).norm() / b.norm()).item() <= 1e-10  # float64


def test_recomputation_uses_the_gates_of_the_forward():
    """Gates changed between a block's forward and its recomputation (as before_step of the next
    step would) must not leak into the backward: the snapshot is replayed."""
    model, layout, denoise, noise, sigmas = make_problem("flux", 1, False)
    logits = random_logits(layout, torch.float64)
    controller = GateController(model, layout)
    replay = gate_replayer(controller, layout, logits)
    params = list(logits.values())
    paths = checkpoint_block_paths(model, layout.arch)

    def grads(disturb):
        with controller.installed(), torch.enable_grad(), checkpointed_blocks(model, paths, controller):
            replay(0)
            out = denoise(noise, sigmas[0])
            if disturb:
                replay(5)  # other gate values while the backward recomputes the blocks
            return torch.autograd.grad(out.square().sum(), params, allow_unused=True)

    reference, disturbed = grads(False), grads(True)
    for a, b in zip(reference, disturbed, strict=True):
        if a is not None:
            assert torch.equal(a, b)


def saved_bytes(name, blocks):
    """Bytes of distinct storages autograd keeps for the backward of one gated, guided step."""
    model, layout, denoise, noise, sigmas = make_problem(name, 1, True)
    logits = random_logits(layout, torch.float64)
    controller = GateController(model, layout)
    paths = checkpoint_block_paths(model, layout.arch) if blocks else []
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with controller.installed(), torch.enable_grad(), checkpointed_blocks(model, paths, controller), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gate_replayer(controller, layout, logits)(0)
        x = noise.clone().requires_grad_(True)
        out = denoise(x, sigmas[0])
        grads = torch.autograd.grad(out.square().sum(), [x] + list(logits.values()), allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    return sum(seen.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_block_checkpointing_reduces_saved_activations(name):
    plain, blocked = saved_bytes(name, False), saved_bytes(name, True)
    assert blocked < 0.5 * plain, (blocked, plain)


@pytest.mark.parametrize("mode, step, free, device, expected", [
    ("on", None, None, "cpu", True), ("off", 10**12, 1, "cuda", False),
    ("auto", None, 1, "cuda", False), ("auto", 10**9, None, "cuda", False),
    ("auto", 10**9, 1, "cpu", False), ("auto", 10**9, 10**8, "cuda", True), ("auto", 10**9, 10**10, "cuda", False),
])
def test_auto_mode_follows_the_preflight(mode, step, free, device, expected):
    class Estimate:
        def total(self, block_checkpointing):
            return step // (10 if block_checkpointing else 1)
    estimate = Estimate() if step is not None else None
    assert use_block_checkpointing(mode, estimate, free, torch.device(device)) is expected


def test_learner_with_block_checkpointing_learns_the_same_mask():
    model, layout, samples, sigmas = samples_for("sdxl", 2)
    results = {}
    for mode in ("off", "on"):
        learner = MaskLearner(model, layout, LearnSettings(**FAST, block_checkpointing=mode))
        assert learner.block_checkpointing is (mode == "on") and bool(learner.block_paths) is (mode == "on")
        results[mode] = learner.learn(samples, sigmas)
    for name in results["off"].logits:
        torch.testing.assert_close(results["on"].logits[name], results["off"].logits[name], rtol=0, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # wrapping removed afterwards


def test_bad_block_checkpointing_setting_is_refused():
    model, layout, _, _ = samples_for("sd15", 1)
    with pytest.raises(SettingsError, match="block_checkpointing"):
        MaskLearner(model, layout, LearnSettings(block_checkpointing="sometimes"))
