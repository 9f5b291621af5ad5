"""The calibration trajectories' settings (``sampling.SamplingSpec``) refuse bad values when they are
made, with the engine's ``SettingsError`` naming the field, as every settings class does."""
from __future__ import annotations

import math

import pytest


@pytest.mark.parametrize("field, value, message", [
    ("sampler_name", "dpmpp_2m", "deterministic trajectory; sampler 'dpmpp_2m'"),
    ("scheduler", "nowhere", "scheduler must be one of .*karras"),
    ("steps", 0, "steps must be >= 1, got 0"),
    ("width", 4, "width must be >= 8, got 4"),
    ("height", 8.5, "height must be an integer"),
    ("cfg", math.nan, "cfg must be a finite number"),
    ("seed", -1, "seed"),
])
def test_bad_sampling_settings_are_settings_errors(sampling, core, field, value, message):
    with pytest.raises(core.errors.SettingsError, match=message):
        sampling.SamplingSpec(**{field: value})


def test_default_sampling_settings_are_valid(sampling):
    spec = sampling.SamplingSpec()
    assert (spec.width, spec.height, spec.steps, spec.sampler_name) == (1024, 1024, 20, "euler")
