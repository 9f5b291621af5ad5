import math

import pytest
import torch

from ecodiff_core.hard_concrete import GateSettings, expected_gate, regularizer, sample_gate, uniform_noise


def reference_gate(lam: float, u: float, s: GateSettings) -> float:
    d = s.noise_offset
    noise = math.log(u + d) - math.log(1 - u + d)
    value = 1 / (1 + math.exp(-(noise + lam) / s.temperature)) * (s.zeta - s.gamma) + s.gamma
    return min(1.0, max(0.0, value))


@pytest.mark.parametrize("offset", [0.0, 0.1, 0.5])
def test_sample_gate_matches_formula(offset):
    s = GateSettings(noise_offset=offset)
    lam = torch.linspace(-4, 4, 17, dtype=torch.float64)
    u = uniform_noise(17, torch.Generator().manual_seed(0)).double()
    got = sample_gate(lam, u, s)
    want = [reference_gate(a, b, s) if offset > 0 else None for a, b in zip(lam.tolist(), u.tolist(), strict=True)]
    if offset > 0:
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert ((got >= 0) & (got <= 1)).all()


def test_same_noise_replays_exactly():
    s = GateSettings()
    lam = torch.randn(1000)
    a = sample_gate(lam, uniform_noise(1000, torch.Generator().manual_seed(7)), s)
    b = sample_gate(lam, uniform_noise(1000, torch.Generator().manual_seed(7)), s)
    assert torch.equal(a, b)


def test_gate_is_hard_at_extremes_and_half_at_zero():
    s = GateSettings()
    assert expected_gate(torch.tensor(-20.0), s) == 0 and expected_gate(torch.tensor(20.0), s) == 1
    assert expected_gate(torch.tensor(0.0), s) == pytest.approx(0.5)


def test_regularizers():
    s = GateSettings()
    a, b = torch.tensor([1.0, -3.0]), torch.tensor([2.0])
    assert regularizer([a, b], "l1", s).item() == pytest.approx((2.0 + 2.0) / 2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = ((sig(1.4) + sig(-0.2)) / 2 + sig(1.8)) / 2
    assert regularizer([a, b], "sigmoid", s).item() == pytest.approx(want)
    shift = 0.83 * math.log(0.1 / 1.1)
    want_l0 = ((sig(1 - shift) + sig(-3 - shift)) / 2 + sig(2 - shift)) / 2
    assert regularizer([a, b], "l0", s).item() == pytest.approx(want_l0)
    with pytest.raises(ValueError, match="unknown regularizer"):
        regularizer([a], "l2", s)


def test_l0_is_probability_gate_is_nonzero():
    """Louizos: P(gate > 0) = sigmoid(λ − β log(−γ/ζ)); check against Monte Carlo with δ = 0."""
    s = GateSettings(noise_offset=0.0)
    lam = torch.full((200_000,), 0.7)
    u = uniform_noise(lam.numel(), torch.Generator().manual_seed(1))
    empirical = (sample_gate(lam, u, s) > 0).float().mean().item()
    assert regularizer([lam[:1]], "l0", s).item() == pytest.approx(empirical, abs=5e-3)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(gamma=0.1), dict(zeta=0.9), dict(noise_offset=-1)])
def test_bad_gate_settings_rejected(kwargs):
    with pytest.raises(ValueError):
        GateSettings(**kwargs)
