"""LoRAs made for the full model, loaded with ComfyUI's stock loader (comfy.sd.load_lora_for_models,
as LoraLoader / LoraLoaderModelOnly do) onto pruned MODELs: pruned + LoRA == soft-gated full + LoRA
on every unit kind (heads, neurons, FLUX modulation channels, FLUX single blocks, emptied and
silenced groups), in ComfyUI-native and diffusers keys, for LoRA, DoRA, LoHa, LoKr, diff and bias
patches; pruned-size LoRAs load unchanged; what cannot be sliced is a clear error."""
from __future__ import annotations

import logging

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import random_keep, rel_err

torch.set_num_threads(1)  # tiny models: intra-op threads only contend (as tests/unit/tiny_models.py)
RANK = 4
BAD_LOG = ("not loaded", "NOT LOADED", "ERROR", "SHAPE MISMATCH", "Calculate Weight Failed")


class LogCapture(logging.Handler):
    def __enter__(self):
        self.lines: list[str] = []
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.lines.append(record.getMessage())


def emptied_groups(layout) -> tuple[str, ...]:
    """Per kind the first group, and on FLUX also a single block's heads and neurons: emptied
    (UNet attention replaced; FLUX/SD3 heads kept silenced, as they must keep one)."""
    names = []
    for kind in layout.kinds():
        names.append(next(g.name for g in layout.groups if g.kind == kind))
    names += [g.name for g in layout.groups if g.name.startswith("single_blocks.1:")]
    return tuple(dict.fromkeys(names))


_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_cached_models():
    yield
    _CACHE.clear()  # ModelPatchers must not live until interpreter shutdown


def pruned_case(arch: str, weights, pruned_models):
    """(tiny, layout, keep, pruned MODEL) with random keep masks and emptied groups."""
    if arch not in _CACHE:
        tiny = ct.tiny(arch, seed=11)
        layout = weights.model_layout(tiny.model)
        keep = random_keep(layout, seed=3, p=0.4, empty=emptied_groups(layout))
        logits = {g.name: torch.randn(g.count, generator=torch.Generator().manual_seed(1)) for g in layout.groups}
        with torch.inference_mode():
            pruned, _ = pruned_models.build_pruned_model(tiny.model, layout, keep, logits)
        _CACHE[arch] = (tiny, layout, keep, pruned)
    return _CACHE[arch]


def cuts_of(pruned):
    return pruned.model.ecodiff_weight_cuts


def _divisor(n: int) -> int:
    return 2 if n % 2 == 0 else 1


def lora_entries(prefix: str, weight: torch.Tensor, kind: str, rows_cut: bool, g: torch.Generator,
                 out: int | None = None, a: str = "lora_up.weight", b: str = "lora_down.weight") -> dict:
    """One layer of a full-size LoRA of ``kind`` for ``weight`` (rows ``out`` of it for offset keys)."""
    out = weight.shape[0] if out is None else out
    inn = weight.shape[1]

    def rnd(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    e = {f"{prefix}.alpha": torch.tensor(float(RANK) / 2)}
    if kind in ("lora", "dora"):
        e[f"{prefix}.{a}"], e[f"{prefix}.{b}"] = rnd(out, RANK), rnd(RANK, inn)
    if kind == "dora":  # magnitude along the dimension that is not cut
        w = weight[:out].float()
        norm = w.norm(dim=1, keepdim=True) if rows_cut else w.norm(dim=0, keepdim=True)
        e[f"{prefix}.dora_scale"] = norm * (1 + 0.2 * torch.randn(norm.shape, generator=g))
    if kind == "loha":
        for i in (1, 2):
            e[f"{prefix}.hada_w{i}_a"], e[f"{prefix}.hada_w{i}_b"] = rnd(out, RANK, s=0.5), rnd(RANK, inn, s=0.5)
    if kind == "lokr":
        p, q = _divisor(out), _divisor(inn)
        e[f"{prefix}.lokr_w1"], e[f"{prefix}.lokr_w2"] = rnd(p, q, s=1.0), rnd(out // p, inn // q, s=0.1)
    if kind == "diff":
        del e[f"{prefix}.alpha"]
        e[f"{prefix}.diff"] = rnd(out, inn, s=0.05)
    return e


KINDS = ("lora", "dora", "loha", "lokr", "diff")


def native_lora(tiny, cuts, seed: int = 5) -> dict:
    """Every Linear of the denoiser, in ComfyUI's generic (``diffusion_model.<path>``) and
    ``lora_unet_<path>`` keys, kinds round-robin, bias diffs on every third layer."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    module = tiny.model.model.diffusion_model
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (path, lin) in enumerate(linears):
        prefix = f"diffusion_model.{path}" if i % 2 == 0 else f"lora_unet_{path.replace('.', '_')}"
        cut = cuts.get(path)
        rows_cut = cut is not None and (cut.rows.numel() != cut.full[0] or cut.silent_rows.numel() > 0)
        lora.update(lora_entries(prefix, lin.weight.detach(), KINDS[i % len(KINDS)], rows_cut, g))
        if lin.bias is not None and i % 3 == 0:
            lora[f"{prefix}.diff_b"] = torch.randn(lin.bias.shape, generator=g) * 0.05
    return lora


def diffusers_lora(tiny, cuts, seed: int = 6) -> dict:
    """A plain LoRA in the keys LoRAs are commonly shared in: kohya ``lora_unet_<diffusers name>``
    for SD1.5/SDXL, diffusers/peft ``transformer.<name>.lora_A/B`` for SD3 and FLUX (separate q/k/v
    that ComfyUI maps into the fused qkv / linear1 with offsets)."""
    import comfy.utils

    cfg = tiny.model.model.model_config.unet_config
    sd = tiny.model.model.diffusion_model.state_dict()
    if tiny.arch in ("sd15", "sdxl"):
        mapping = {f"lora_unet_{k[:-7].replace('.', '_')}": v for k, v in comfy.utils.unet_to_diffusers(cfg).items()
                   if k.endswith(".weight")}
        names = ("lora_up.weight", "lora_down.weight")
    else:
        convert = comfy.utils.flux_to_diffusers if tiny.arch == "flux" else comfy.utils.mmdit_to_diffusers
        mapping = {f"transformer.{k[:-7]}": v for k, v in convert(cfg).items() if k.endswith(".weight")}
        names = ("lora_B.weight", "lora_A.weight")
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, target in sorted(mapping.items()):
        target, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        weight = sd.get(target)
        if weight is None or weight.ndim != 2:
            continue
        lora.update(lora_entries(key, weight, "lora", False, g, None if offset is None else offset[2], *names))
    return lora


def load(model, lora):
    import comfy.sd

    with LogCapture() as logs:
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return patched, [line for line in logs.lines if any(b in line for b in BAD_LOG)]


def sample(tiny, model):
    with LogCapture() as logs:
        out = ct.sample(model, tiny.positive, tiny.negative, seed=2)
    bad = [line for line in logs.lines if any(b in line for b in BAD_LOG)]
    assert not bad, bad[:3]
    return out


@pytest.mark.parametrize("fmt", ["native", "diffusers"])
@pytest.mark.parametrize("arch", ct.ARCHS)
def test_full_lora_on_pruned_equals_soft_gated(arch, fmt, weights, soft_gates, pruned_models):
    tiny, layout, keep, pruned = pruned_case(arch, weights, pruned_models)
    cuts = cuts_of(pruned)
    lora = (native_lora if fmt == "native" else diffusers_lora)(tiny, cuts)
    with torch.inference_mode():
        full_lora, full_bad = load(tiny.model, lora)
        pruned_lora, pruned_bad = load(pruned, lora)
        assert not full_bad, full_bad[:3]  # the test's LoRA fits the full model
        assert not pruned_bad, pruned_bad[:3]  # and every layer of it is taken by the pruned one
        soft_lora = soft_gates.soft_gated_model(full_lora, layout, keep)
        a, b = sample(tiny, pruned_lora), sample(tiny, soft_lora)
        plain = sample(tiny, pruned)
    assert type(pruned_lora) is type(pruned)
    assert rel_err(a, b) <= 1e-5
    assert rel_err(a, plain) > 1e-3  # the LoRA does something


def test_every_unit_kind_is_sliced(weights, pruned_models):
    """The cases above cover heads, neurons, modulation channels, FLUX single blocks, emptied
    (replaced) and silenced groups."""
    seen = set()
    for arch in ct.ARCHS:
        _, layout, keep, pruned = pruned_case(arch, weights, pruned_models)
        record = pruned.model.ecodiff_pruning
        cuts = cuts_of(pruned)
        seen |= {g.kind for g in layout.groups if not bool(keep[g.name].all())}
        seen |= {"replaced"} if any(c.removed for c in cuts.values()) else set()
        seen |= {"silenced"} if record["silenced"] else set()
        single = any(p.startswith("single_blocks.") and c.changed for p, c in cuts.items())
        seen |= {"single block"} if single else set()
    assert seen == {"head", "neuron", "channel", "replaced", "silenced", "single block"}


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_pruned_size_lora_loads_unchanged(arch, weights, pruned_models):
    """A LoRA trained on the pruned model (LoRA Recover's keys) is added exactly as given."""
    tiny, _, _, pruned = pruned_case(arch, weights, pruned_models)
    g = torch.Generator().manual_seed(9)
    lora = {}
    for path, lin in pruned.model.diffusion_model.named_modules():
        w = getattr(lin, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.numel() and path in cuts_of(pruned):
            lora[f"diffusion_model.{path}.lora_up.weight"] = torch.randn(w.shape[0], RANK, generator=g) * 0.2
            lora[f"diffusion_model.{path}.lora_down.weight"] = torch.randn(RANK, w.shape[1], generator=g) * 0.2
            lora[f"diffusion_model.{path}.alpha"] = torch.tensor(float(RANK))
    assert any(cuts_of(pruned)[k.split(".", 1)[1].rsplit(".lora_up", 1)[0]].shape !=
               cuts_of(pruned)[k.split(".", 1)[1].rsplit(".lora_up", 1)[0]].full for k in lora if "lora_up" in k)
    with torch.inference_mode():
        patched, bad = load(pruned, lora)
        assert not bad, bad[:3]
        for key, patches in patched.patches.items():
            up = lora[f"{key[:-len('.weight')]}.lora_up.weight"]
            assert patches[-1][1].weights[0] is up  # the very tensor given, not a slice of it
        assert len(patched.patches) == len(lora) // 3
        assert rel_err(sample(tiny, patched), sample(tiny, pruned)) > 1e-3


def _consumer_with_removed_columns(cuts):
    return next(p for p, c in cuts.items() if not c.removed and 0 < c.cols.numel() < c.full[1])


@pytest.mark.parametrize("problem", ["dora_across_cut", "oft", "other_shape"])
def test_unsliceable_lora_is_a_clear_error(problem, weights, pruned_models, core):
    import comfy.sd

    tiny, _, _, pruned = pruned_case("sd15", weights, pruned_models)
    cuts = cuts_of(pruned)
    path = _consumer_with_removed_columns(cuts)
    weight = tiny.model.model.diffusion_model.get_submodule(path).weight.detach()
    prefix = f"diffusion_model.{path}"
    g = torch.Generator().manual_seed(1)
    if problem == "dora_across_cut":  # row norms over input columns that pruning removed
        lora = lora_entries(prefix, weight, "lora", False, g)
        lora[f"{prefix}.dora_scale"] = weight.norm(dim=1, keepdim=True)
    elif problem == "oft":
        lora = {f"{prefix}.oft_blocks": torch.randn(weight.shape[0] // 4, 4, 4, generator=g) * 0.1}
    else:
        lora = lora_entries(prefix, weight[:, :-1], "lora", False, g)
    with torch.inference_mode(), pytest.raises(core.errors.EcoDiffError, match="BEFORE Apply Pruned Mask") as exc:
        comfy.sd.load_lora_for_models(pruned, None, lora, 1.0, 0.0)
    assert path in str(exc.value)
    with torch.inference_mode():  # on the full model the same LoRA loads, and applying it before pruning works
        full_lora, _ = comfy.sd.load_lora_for_models(tiny.model, None, lora, 1.0, 0.0)
        assert full_lora.patches


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_loaded_pruned_model_and_its_clones_take_full_lora(arch, weights, pruned_models, pruned_files, tmp_path):
    tiny, _, _, pruned = pruned_case(arch, weights, pruned_models)
    lora = native_lora(tiny, cuts_of(pruned), seed=8)
    with torch.inference_mode():
        path = pruned_files.save_pruned_model(pruned, tmp_path / f"{arch}.safetensors")
        loaded = pruned_files.load_pruned_model(path).clone().clone()
        assert type(loaded) is type(pruned)
        from_file, bad = load(loaded, lora)
        assert not bad, bad[:3]
        built, _ = load(pruned.clone(), lora)
        assert rel_err(sample(tiny, from_file), sample(tiny, built)) <= 1e-6
        stacked, bad = load(from_file, diffusers_lora(tiny, cuts_of(pruned)))  # a second LoRA on the first
        assert not bad and len(stacked.patches) > len(from_file.patches) - 1


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_lora_loaded_before_apply_is_merged(arch, weights, soft_gates, pruned_models):
    tiny, layout, keep, pruned = pruned_case(arch, weights, pruned_models)
    lora = diffusers_lora(tiny, {}, seed=4)
    logits = {g.name: torch.zeros(g.count) for g in layout.groups}
    with torch.inference_mode():
        full_lora, _ = load(tiny.model, lora)
        pruned_lora, _ = pruned_models.build_pruned_model(full_lora, layout, keep, logits)
        assert not pruned_lora.patches  # merged into the pruned weights, nothing left to patch
        a = sample(tiny, pruned_lora)
        b = sample(tiny, soft_gates.soft_gated_model(full_lora, layout, keep))
        c = sample(tiny, pruned)  # pruned without the LoRA
    assert rel_err(a, b) <= 1e-5 and rel_err(a, c) > 1e-3


def test_key_map_wrapper_leaves_other_models_alone(weights, pruned_models):
    import comfy.lora

    tiny, _, _, pruned = pruned_case("sd15", weights, pruned_models)
    assert getattr(comfy.lora.model_lora_keys_unet, "ecodiff_wrapped", False)
    full_keys = comfy.lora.model_lora_keys_unet(tiny.model.model, {})
    original = comfy.lora.model_lora_keys_unet.__wrapped__(tiny.model.model, {})
    assert full_keys == original
    removed = [p for p, c in cuts_of(pruned).items() if c.removed]
    assert removed
    pruned_keys = comfy.lora.model_lora_keys_unet(pruned.model, {})
    assert all(f"diffusion_model.{p}" in pruned_keys for p in removed)
    assert set(map(str, pruned_keys.values())) <= set(map(str, full_keys.values()))


def test_hook_lora_on_pruned_is_fitted_like_a_plain_lora(weights, pruned_models):
    """ComfyUI's hook LoRAs (Create Hook LoRA, add_hook_patches) get the same fitted patches."""
    import comfy.hooks
    import comfy.lora

    tiny, _, _, pruned = pruned_case("flux", weights, pruned_models)
    lora = diffusers_lora(tiny, cuts_of(pruned), seed=12)
    with torch.inference_mode(), LogCapture() as logs:
        hooked, _, group = comfy.hooks.load_hook_lora_for_models(pruned, None, lora, 1.0, 0.0)
        plain, _ = load(pruned, lora)
        sd = pruned.model.state_dict()
        hook_patches = hooked.hook_patches[group.hooks[0].hook_ref]
        assert set(hook_patches) == set(plain.patches)
        changed = 0
        for key, patches in plain.patches.items():
            w = sd[key].float()
            a = comfy.lora.calculate_weight(hook_patches[key], w.clone(), key)
            b = comfy.lora.calculate_weight(patches, w.clone(), key)
            assert torch.equal(a, b)
            changed += not torch.equal(a, w)
        assert changed > len(plain.patches) // 2
    assert not [line for line in logs.lines if any(b in line for b in BAD_LOG)]
