"""The embedded digits model as ComfyUI MODEL / CLIP / VAE (ecodiff_comfy.demo_model, nodes/demo.py).

The reference is the diffusers model itself (``ecodiff_core.embedded.DefaultModel``): same noise, same
prompts, same σ schedule → the same samples through ComfyUI's own sampler and FLUX class.
"""
from __future__ import annotations

import pytest
import torch

from comfy_checks import random_keep, rel_err
from scripts.comfy_env import sub


@pytest.fixture(scope="module")
def demo():
    return sub("ecodiff_comfy.demo_model")


@pytest.fixture(scope="module")
def judge():
    return sub("ecodiff_comfy.demo_judge")


@pytest.fixture(scope="module")
def emb():
    return sub("ecodiff_core.embedded")


@pytest.fixture(scope="module")
def reference(emb):
    return emb.load_default_model()


@pytest.fixture(scope="module")
def loaded(demo):
    with torch.inference_mode():  # as ComfyUI's executor runs the loader node
        return demo.load_demo()


DIGIT_PROMPTS = [f"the digit {d}" for d in range(10)]


def comfy_samples(mp, clip, prompts: list[str], noise: torch.Tensor, sigmas: torch.Tensor, cfg: float) -> torch.Tensor:
    """ComfyUI's own sampling path (CFGGuider + k-diffusion Euler) for explicit noise and σ schedule."""
    import comfy.sample
    import comfy.samplers

    pos = clip.encode_from_tokens_scheduled(clip.tokenize("\n".join(prompts)))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    with torch.inference_mode():
        return comfy.sample.sample_custom(mp, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, pos, neg,
                                          torch.zeros_like(noise), disable_pbar=True, seed=0)


@pytest.mark.parametrize("cfg,steps,seed", [(1.5, 10, 0), (1.0, 6, 3), (2.0, 4, 5)])
def test_comfy_model_samples_equal_the_diffusers_model(loaded, reference, emb, cfg, steps, seed):
    mp, clip, _ = loaded
    prompts = DIGIT_PROMPTS + ["a handwritten seven", "the number 3"]
    noise = emb.initial_noise(len(prompts), seed)
    sigmas = emb.sigmas(steps)
    expected = reference.sample_latents(prompts, steps=steps, cfg=cfg, seed=seed)  # packed (B, 16, 4)
    got = comfy_samples(mp, clip, prompts, emb.unpack(noise, clamp=False), sigmas, cfg)  # (B, 1, 8, 8)
    assert got.shape == (len(prompts), 1, 8, 8)
    assert rel_err(emb.pack(got), expected) <= 1e-4


def test_ksampler_simple_schedule_is_the_models_schedule(loaded, emb):
    import comfy.samplers

    mp = loaded[0]
    for steps in (4, 10, 20):
        got = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "simple", steps).float()
        torch.testing.assert_close(got, emb.sigmas(steps), atol=1e-6, rtol=0)


def test_clip_encodes_like_the_shipped_text_encoder(loaded, reference):
    clip = loaded[1]
    cases = [("the digit 7", ["the digit 7"]), ("", [""]),
             ("a handwritten seven\n\n  the number 3 \n", ["a handwritten seven", "the number 3"])]
    for text, lines in cases:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        tokens, pooled = reference.encode(lines)
        assert len(cond) == 1 and cond[0][0].shape == (len(lines), 10, 64)
        torch.testing.assert_close(cond[0][0], tokens, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cond[0][1]["pooled_output"], pooled, atol=1e-6, rtol=1e-6)
    assert type(clip).__module__ == "comfy.sd" and clip.clone().tokenize("7")


def test_vae_shows_the_latent_and_encodes_it_back(loaded, emb):
    vae = loaded[2]
    digits = emb.load_digit_split().test_images[:6]  # (6, 1, 8, 8) in [-1, 1]
    images = vae.decode(digits * 1.5)  # out-of-range values are clamped
    assert images.shape == (6, 64, 64, 3) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images[:, ::8, ::8, 0], ((digits * 1.5).clamp(-1, 1)[:, 0] + 1) / 2)
    torch.testing.assert_close(vae.encode(images), (digits * 1.5).clamp(-1, 1), atol=1e-6, rtol=0)
    with pytest.raises(Exception, match="1-channel"):
        vae.decode(torch.zeros(1, 4, 8, 8))


def test_judge_reads_decoded_images_like_the_engine_judge(loaded, judge, emb):
    split = emb.load_digit_split()
    images, labels = split.test_images[:40], split.test_labels[:40]
    got = judge.judge_images(loaded[2].decode(images), labels.tolist())
    expected = emb.load_judge().evaluate(images, labels)
    for key in ("accuracy", "confidence", "fd_judge"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert got["count"] == 40 and got["fd_floor"] > 0
    cycled = judge.judge_images(loaded[2].decode(images[:3]), [int(labels[0]), int(labels[1]), int(labels[2]), 9])
    assert cycled["count"] == 3
    assert judge.parse_digits("0, 1 2;3") == [0, 1, 2, 3]
    with pytest.raises(Exception, match="no digits"):
        judge.parse_digits("seven")


def test_units_match_the_diffusers_layout(loaded, reference, weights):
    from_comfy = weights.model_layout(loaded[0])
    from_diffusers = sub("ecodiff_core.archs").find_layout(reference.transformer)
    assert from_comfy.arch == "comfy_flux"
    count = lambda layout, kind: sum(g.count for g in layout.groups if g.kind == kind)  # noqa: E731
    for kind in ("head", "neuron", "channel"):
        assert count(from_comfy, kind) == count(from_diffusers, kind) > 0, kind


def test_pruned_demo_model_saves_and_loads(loaded, folders, weights, pruned_models, pruned_files, emb):
    mp, clip, _ = loaded
    layout = weights.model_layout(mp)
    keep = random_keep(layout, seed=4, p=0.3)
    logits = {name: k.float() for name, k in keep.items()}
    pruned, _ = pruned_models.build_pruned_model(mp, layout, keep, logits)
    path = pruned_files.save_pruned_model(pruned, folders.folder(folders.PRUNED_FOLDER) / "demo_pruned.safetensors")
    back = pruned_files.load_pruned_model(path)
    assert type(back.model.model_config).__name__ == "EcoDiffDemoFlux"
    assert back.model.latent_format.latent_channels == 1
    noise, sigmas = emb.unpack(emb.initial_noise(4, 9), clamp=False), emb.sigmas(5)
    a = comfy_samples(pruned, clip, DIGIT_PROMPTS[:4], noise, sigmas, 1.5)
    b = comfy_samples(back, clip, DIGIT_PROMPTS[:4], noise, sigmas, 1.5)
    assert rel_err(b, a) <= 1e-5
    assert rel_err(a, comfy_samples(mp, clip, DIGIT_PROMPTS[:4], noise, sigmas, 1.5)) > 1e-3  # really pruned


def test_nodes_return_the_demo_objects_and_judge_text(loaded, nodes):
    with torch.inference_mode():
        model, clip, vae = nodes.DemoModel.execute().args
        assert model is not loaded[0] and model.model.diffusion_model is not loaded[0].model.diffusion_model
        images = vae.decode(sub("ecodiff_core.embedded").load_digit_split().test_images[:20])
        out = nodes.JudgeDigits.execute(images=images, digits="0", label="real")
    accuracy, fd, text = out.args
    assert 0.0 <= accuracy <= 1.0 and fd > 0
    assert text.startswith("real\naccuracy") and out.ui["text"] == (text,)
