import pytest
import torch

from ecodiff_core.baselines import magnitude_scores, random_scores, taylor_scores
from ecodiff_core.gate_hooks import GateController
from ecodiff_core.units import get_linear
from test_learning import make_problem


def test_magnitude_of_one_head_by_hand():
    model, layout, *_ = make_problem("sd15", 1, False)
    group = next(g for g in layout.groups if g.kind == "head")
    scores = magnitude_scores(model, layout)
    unit, w = 1, group.width
    parts = [get_linear(model, s.module).weight for s in group.producers]
    parts = [p[unit * w:(unit + 1) * w] for p in parts]
    parts += [get_linear(model, s.module).weight[:, unit * w:(unit + 1) * w] for s in group.gates]
    expected = (sum(p.double().pow(2).sum() for p in parts) / sum(p.numel() for p in parts)).sqrt()
    assert scores[group.name][unit].item() == pytest.approx(expected.item(), rel=1e-5)


def test_random_scores_follow_the_seed():
    _, layout, *_ = make_problem("flux", 1, False)
    a, b, c = random_scores(layout, 0), random_scores(layout, 0), random_scores(layout, 1)
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)


def test_taylor_scores_are_squared_gate_gradients():
    """One step: the score is (∂/∂m MSE(denoise_m(x_T), x_final))² at m = 1, by plain autograd."""
    model, layout, denoise, noise, sigmas = make_problem("flux", 1, True)
    scores = taylor_scores(model, layout, [denoise], [noise], sigmas)
    gates = {g.name: torch.ones(g.count, dtype=torch.float64, requires_grad=True) for g in layout.groups}
    controller = GateController(model, layout)
    with controller.installed():
        with torch.no_grad():
            final = denoise(noise, sigmas[0])
        controller.set(gates)
        loss = torch.nn.functional.mse_loss(denoise(noise, sigmas[0]), final)
        grads = torch.autograd.grad(loss, list(gates.values()))
    for name, grad in zip(gates, grads, strict=True):
        torch.testing.assert_close(scores[name].double(), grad.pow(2), rtol=1e-6, atol=1e-20)
