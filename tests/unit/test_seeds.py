"""Derived seeds: (seed + offset) mod 2**64, one rule for every place the pack derives seeds."""
import pytest

from ecodiff_core.errors import SettingsError
from ecodiff_core.seeds import SEED_MAX, check_seed, derived_seed


@pytest.mark.parametrize("seed,offset,expected", [(0, 0, 0), (7, 2, 9), (SEED_MAX, 0, SEED_MAX), (SEED_MAX, 1, 0),
                                                  (SEED_MAX, 1001, 1000), (SEED_MAX - 1, 3, 1)])
def test_derived_seed_wraps_modulo_2_64(seed, offset, expected):
    assert derived_seed(seed, offset) == expected == (seed + offset) % 2**64


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "1", None])
def test_bad_seeds_are_settings_errors(seed):
    with pytest.raises(SettingsError, match=r"seed must be an integer in 0\.\.18446744073709551615"):
        check_seed(seed)


def test_calibration_noise_of_the_largest_seed_wraps():
    """The demo's calibration chunk k uses derived_seed(seed, 1000 + k): at the largest seed, chunk 0
    starts from the noise of seed 999."""
    import torch

    from ecodiff_core.embedded.demo import calibration_samples
    from ecodiff_core.embedded.model import initial_noise

    class Stub:
        def conditioning(self, chunk, cfg):
            return None

        def batch_denoiser(self, cfg):
            return lambda conditioning: None

    samples = calibration_samples(Stub(), ["a", "b", "c"], 1.0, 2, SEED_MAX)
    assert torch.equal(samples[0].noise, initial_noise(2, 999))
    assert torch.equal(samples[1].noise, initial_noise(1, 1000))
