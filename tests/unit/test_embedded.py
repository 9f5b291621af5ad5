"""The embedded default model and judge: shipped weights, sampling quality, tokenizer, FD-judge."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ecodiff_core.embedded import (
    CALIBRATION_LABELS,
    CALIBRATION_PROMPTS,
    CLASS_NAMES,
    LATENT_SHAPE,
    FeatureStats,
    Tokenizer,
    WeightsMissingError,
    captions_for_class,
    frechet_distance,
    initial_noise,
    load_default_model,
    load_digit_split,
    load_judge,
    pack,
    real_data_floor,
    sigmas,
    unpack,
)
from ecodiff_core.embedded.text import UNK_ID
from ecodiff_core.trajectory import euler_step


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_default_model()


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def split():
    return load_digit_split()


def test_shipped_weights_load(model) -> None:
    params = sum(p.numel() for p in model.transformer.parameters())
    assert 1_000_000 < params < 3_000_000
    assert type(model.transformer).__name__ == "FluxTransformer2DModel"
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not model.training


def test_missing_weights_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(WeightsMissingError, match="train_default_model.py"):
        load_default_model(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="train_judge.py"):
        load_judge(tmp_path)


def test_tokenizer_maps_unknown_words_to_unk(model) -> None:
    tok = Tokenizer(max_length=10)
    ids, mask = tok(["a purple elephant seven!", "", "seven " * 30])
    assert ids[0, 2].item() == UNK_ID and ids[0, 3].item() == UNK_ID
    assert ids[0, 4].item() != UNK_ID  # "seven" is known; "!" is dropped
    assert mask[0].sum() == 5 and mask[1].sum() == 1 and mask[2].all()
    tokens, pooled = model.encode(["a purple elephant seven", "", "completely unknown words here"])
    assert tokens.shape == (3, 10, 64) and pooled.shape == (3, 64)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


def test_captions_and_calibration_prompts() -> None:
    assert len(CLASS_NAMES) == 10 and "seven" in captions_for_class(7)[0]
    assert len(CALIBRATION_PROMPTS) == len(CALIBRATION_LABELS) == 100
    assert len(set(CALIBRATION_PROMPTS)) == 100


def test_pack_unpack_and_schedule() -> None:
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    assert pack(images).shape == (3, *LATENT_SHAPE)
    assert torch.equal(unpack(pack(images)), images)
    s = sigmas(10)
    assert len(s) == 11 and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert (sigmas(10, shift=3.0)[1:-1] > s[1:-1]).all()
    x, x0 = torch.randn(2, 16, 4), torch.randn(2, 16, 4)
    assert torch.allclose(euler_step(x, x0, s[-2], s[-1]), x0, atol=1e-6)
    assert torch.equal(initial_noise(4, seed=3), initial_noise(4, seed=3))


def test_samples_are_the_requested_digits(model, judge) -> None:
    torch.manual_seed(0)
    images = model.sample(CALIBRATION_PROMPTS, steps=6, cfg=1.5, seed=0)
    assert images.shape == (100, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    metrics = judge.evaluate(images, CALIBRATION_LABELS)
    assert metrics["accuracy"] >= 0.9, metrics


def test_sampling_is_deterministic_and_accepts_a_transformer_copy(model) -> None:
    prompts = ["a handwritten three", "the digit 8"]
    a = model.sample_latents(prompts, steps=4, cfg=1.5, seed=1)
    b = model.sample_latents(prompts, steps=4, cfg=1.5, seed=1, transformer=copy.deepcopy(model.transformer))
    assert torch.allclose(a, b, atol=1e-6)
    assert model.sample_latents(prompts, steps=4, cfg=1.0, seed=1).shape == (2, *LATENT_SHAPE)


def test_denoiser_backpropagates_into_the_transformer(model) -> None:
    net = copy.deepcopy(model.transformer).requires_grad_(True)
    denoise = model.make_denoiser(["a handwritten five"] * 2, cfg=1.5, transformer=net)
    x0 = denoise(initial_noise(2, seed=0), torch.tensor(0.5))
    x0.square().mean().backward()
    assert net.single_transformer_blocks[0].proj_mlp.weight.grad is not None


def test_judge_and_fd_against_shipped_stats(judge, split) -> None:
    accuracy = (judge.predict(split.test_images).argmax(-1) == split.test_labels).float().mean()
    assert accuracy >= 0.98
    assert judge.fd_judge(split.test_images) < 1e-3  # the stats are those of this very set
    floor = real_data_floor(judge, n=500, seed=0)
    assert 0 < floor < 15
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge.fd_judge(noise) > 20 * floor


def test_frechet_distance_handles_singular_covariances() -> None:
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(50, 5)) @ rng.normal(size=(5, 32))  # rank-5 covariance in 32-d
    s = FeatureStats.of(np.maximum(low_rank, 0))
    assert abs(frechet_distance(s, s)) < 1e-6
    a, b = FeatureStats.of(rng.normal(size=(400, 4))), FeatureStats.of(rng.normal(1.0, 2.0, size=(400, 4)))
    from scipy.linalg import sqrtm

    ref = ((a.mean - b.mean) ** 2).sum() + np.trace(a.cov + b.cov - 2 * sqrtm(a.cov @ b.cov).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
