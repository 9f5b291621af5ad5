"""The LoRA Recover engine on the embedded model: settings, LoRA math, the loop, resume, CLI."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ecodiff_core import safetensors_file
from ecodiff_core.archs import find_layout
from ecodiff_core.embedded.demo import prune_to
from ecodiff_core.embedded.model import initial_noise, load_default_model, sigmas
from ecodiff_core.errors import EcoDiffError, SettingsError
from ecodiff_core.learn import frozen_weights
from ecodiff_core.plan import PruneTarget
from ecodiff_core.recover import (
    DistillProblem,
    LoraRecoverer,
    LoraWeights,
    RecoverSettings,
    RecoverState,
    distillation_loss,
    load_recover_state,
    lora_target_paths,
    rollout_states,
    save_recover_state,
    teacher_targets,
)

PROMPTS = ["a handwritten three", "the digit seven", "a written zero", "number five"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture(scope="module")
def pruned(model):
    layout = find_layout(model.transformer)
    gen = torch.Generator().manual_seed(0)
    logits = {g.name: torch.randn(g.count, generator=gen) for g in layout.groups}
    return prune_to(model.transformer, layout, logits, PruneTarget(params=0.5))[0], layout


@pytest.mark.parametrize("field,value,match", [
    ("rank", 0, "rank"), ("alpha", 0.0, "alpha"), ("alpha", float("nan"), "alpha"), ("targets", "conv", "targets"),
    ("steps", 0, "steps"), ("lr", -1.0, "learning rate"), ("lr", float("inf"), "learning rate"),
    ("batch", 0, "batch"), ("states", "teacher", "states"),
])
def test_bad_settings_are_refused(field, value, match):
    with pytest.raises(SettingsError, match=match):
        RecoverSettings(**{field: value})
    assert issubclass(SettingsError, EcoDiffError)


def test_settings_round_trip():
    s = RecoverSettings(rank=3, alpha=1.5, targets="all_linear", steps=7, lr=1e-4, batch=2, seed=9, states="original")
    assert RecoverSettings.from_dict(s.to_dict()) == s


def test_target_sets_nest_and_are_linears(model, pruned):
    module, layout = pruned
    att = lora_target_paths(module, layout, "attention")
    ffn = lora_target_paths(module, layout, "attention_ffn")
    every = lora_target_paths(module, layout, "all_linear")
    assert set(att) < set(ffn) < set(every)
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.weight.numel()]
    assert every == linears
    assert any(p.endswith("to_q") for p in att) and not any("ff" in p.split(".")[-2:] for p in att)


@pytest.mark.parametrize("scatter", [False, True], ids=["linear", "scatter_linear"])
def test_hooks_and_merged_weight_compute_the_same_update(scatter):
    """Also on a pruned modulation layer (ScatterLinear): ΔW covers its computed rows only."""
    from ecodiff_core.prune import scatter_rows

    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    rows = torch.tensor([0, 2, 3, 4, 7])
    if scatter:
        lin = scatter_rows(lin, rows, 9)
    holder = nn.Sequential(lin)
    lora = LoraWeights({"0": (5, 6)}, rank=2, alpha=3.0, seed=1)
    with torch.no_grad():
        lora.up[0].copy_(torch.randn(5, 2))
    lora = lora.double()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = x @ (lin.weight + 1.5 * lora.up[0] @ lora.down[0]).T + lin.bias
    if scatter:
        expected = torch.zeros(4, 9, dtype=torch.float64).index_copy(-1, rows, expected)
    with lora.installed(holder):
        hooked = holder(x)
    merged = nn.functional.linear(x, lora.merged_weight("0", lin.weight), lin.bias)
    if scatter:
        merged = torch.zeros(4, 9, dtype=torch.float64).index_copy(-1, rows, merged)
    assert torch.allclose(hooked, expected, atol=1e-12) and torch.allclose(merged, expected, atol=1e-12)
    assert torch.equal(holder(x), lin(x))  # hooks removed
    assert lora.delta("0").shape == (5, 6)


def test_tensors_use_the_loader_layout_and_round_trip():
    lora = LoraWeights({"blocks.0.attn": (4, 8)}, rank=2, alpha=2.0, seed=3)
    t = lora.tensors()
    assert set(t) == {"diffusion_model.blocks.0.attn.lora_up.weight", "diffusion_model.blocks.0.attn.lora_down.weight",
                      "diffusion_model.blocks.0.attn.alpha"}
    assert t["diffusion_model.blocks.0.attn.lora_down.weight"].shape == (2, 8)
    other = LoraWeights({"blocks.0.attn": (4, 8)}, rank=2, alpha=2.0, seed=4)
    other.load_tensors(t)
    assert torch.equal(other.down[0], lora.down[0])
    with pytest.raises(EcoDiffError, match="does not fit"):
        LoraWeights({"blocks.0.attn": (4, 9)}, rank=2, alpha=2.0).load_tensors(t)


def problems_for(model, student, teacher, lora, source="pruned", steps=4):
    out = []
    sig = sigmas(steps)
    for k, chunk in enumerate((PROMPTS[:2], PROMPTS[2:])):
        s_den = model.make_denoiser(chunk, 1.5, student)
        t_den = model.make_denoiser(chunk, 1.5, teacher)
        with lora.installed(student):
            states = rollout_states(s_den if source == "pruned" else t_den, initial_noise(len(chunk), k), sig)
        out.append(DistillProblem(s_den, states, sig[:-1], teacher_targets(t_den, states, sig[:-1])))
    return out


def test_unpruned_student_starts_at_zero_loss(model):
    layout = find_layout(model.transformer)
    student = copy.deepcopy(model.transformer)
    lora = LoraWeights.for_module(student, lora_target_paths(student, layout, "attention"), 4, 4.0)
    probs = problems_for(model, student, model.transformer, lora)
    with lora.installed(student):
        assert distillation_loss(probs) == 0.0  # up = 0: ΔW = 0, the student is the teacher


def run(model, pruned, steps, resume=None, settings=None):
    module, layout = pruned
    settings = settings or RecoverSettings(rank=4, alpha=4.0, steps=steps, lr=5e-3, batch=2, seed=1)
    lora = LoraWeights.for_module(module, lora_target_paths(module, layout, settings.targets), settings.rank,
                                  settings.alpha, settings.seed)
    with frozen_weights(module), frozen_weights(model.transformer):
        probs = problems_for(model, module, model.transformer, lora)
        rec = LoraRecoverer(lora, settings, layout.arch, "fp", resume)
        with lora.installed(module):
            before = distillation_loss(probs)
            state = rec.train(probs)
            after = distillation_loss(probs)
    return state, before, after, lora


def test_recovery_lowers_the_distillation_loss(model, pruned):
    state, before, after, _ = run(model, pruned, 20)
    assert state.progress == {"step": 20, "finished": True} and not state.stop_reason
    assert after < 0.7 * before, (before, after)
    assert len(state.history) == 20


def test_resume_continues_the_same_run(model, pruned, tmp_path):
    settings = RecoverSettings(rank=4, alpha=4.0, steps=6, lr=5e-3, batch=2, seed=1)
    straight = run(model, pruned, 6, settings=settings)[0]
    half = run(model, pruned, 3, settings=dataclasses.replace(settings, steps=3))[0]
    path = save_recover_state(tmp_path / "state.safetensors", half)
    resumed = run(model, pruned, 6, resume=load_recover_state(path), settings=settings)[0]
    assert resumed.progress["step"] == 6 and [h["step"] for h in resumed.history] == list(range(1, 7))
    for k in straight.lora:
        assert torch.allclose(resumed.lora[k], straight.lora[k], rtol=1e-5, atol=1e-7), k
    with pytest.raises(EcoDiffError, match="rank"):
        run(model, pruned, 6, resume=load_recover_state(path), settings=dataclasses.replace(settings, rank=2))


@pytest.mark.parametrize("saved, loads", [
    ({"rank": 3, "alpha": 1.5, "from_a_newer_version": 1}, {"rank": 3, "alpha": 1.5}),  # unknown keys ignored
    ({"rank": 3}, {"rank": 3, "alpha": RecoverSettings().alpha}),  # missing keys take the defaults
    ({"rank": -1}, "damaged metadata.*rank"),
    ({"targets": "everything"}, "damaged metadata.*targets"),
    ([1, 2], "damaged metadata"),
])
def test_saved_settings_load_typed_and_forward_compatible(tmp_path, saved, loads):
    """A Recover state keeps typed ``RecoverSettings``: they load like ``MaskState``'s, and bad saved
    values are a damaged-file error, not a crash later."""
    state = RecoverState("a", "f", {"x.lora_A.weight": torch.zeros(2, 3)}, RecoverSettings(rank=5))
    assert load_recover_state(save_recover_state(tmp_path / "ok.safetensors", state)).settings == state.settings
    path = tmp_path / "state.safetensors"
    tensors, meta = safetensors_file.read(save_recover_state(path, state), what="test")
    save_file(tensors, str(path), metadata={**meta, "settings": json.dumps(saved)})
    if isinstance(loads, str):
        with pytest.raises(EcoDiffError, match=loads):
            load_recover_state(path)
    else:
        settings = load_recover_state(path).settings
        assert isinstance(settings, RecoverSettings)
        assert {k: getattr(settings, k) for k in loads} == loads


def test_non_finite_loss_stops_with_the_last_good_lora(model, pruned):
    module, layout = pruned
    settings = RecoverSettings(rank=2, alpha=2.0, steps=3, batch=1)
    lora = LoraWeights.for_module(module, lora_target_paths(module, layout, "attention"), 2, 2.0)
    probs = problems_for(model, module, model.transformer, lora, steps=2)
    probs[0].targets = [torch.full_like(t, float("nan")) for t in probs[0].targets]
    probs[1].targets = [torch.full_like(t, float("nan")) for t in probs[1].targets]
    with frozen_weights(module), lora.installed(module):
        state = LoraRecoverer(lora, settings, layout.arch, "fp").train(probs)
    assert "non-finite" in state.stop_reason and state.progress["step"] == 0
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in state.lora.items() if "lora_up" in k)


@pytest.mark.parametrize("argv,message", [
    (["--rank", "0"], "rank must be"), (["--lr", "0"], "learning rate"), (["--batch", "0"], "batch must be"),
])
def test_command_line_refuses_bad_settings(argv, message, capsys):
    assert_cli_error(["recover", *argv], message, capsys)


def test_command_line_defaults_are_the_engine_defaults():
    import argparse

    from ecodiff_core.__main__ import _recover_parser

    parser = argparse.ArgumentParser()
    _recover_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["recover"])
    d = RecoverSettings()
    assert (args.rank, args.alpha, args.targets, args.steps, args.lr, args.batch, args.states) == \
        (d.rank, d.alpha, d.targets, d.steps, d.lr, d.batch, d.states)


@pytest.mark.parametrize("argv,message", [
    (["--state-steps", "0"], "state-steps must be"), (["--sparsity", "20"], "fraction"),
    (["--eval-per-class", "-1"], "eval-per-class"), (["--mask", "no/such/mask.safetensors"], "does not exist"),
])
def test_command_line_refuses_bad_run_arguments(argv, message, capsys):
    assert_cli_error(["recover", *argv], message, capsys)


def test_command_line_refuses_a_file_as_output(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert_cli_error(["recover", "--output", str(target)], "is a file", capsys)


def assert_cli_error(argv: list[str], message: str, capsys) -> None:
    """One ``error:`` line naming the problem, exit code 2, no traceback."""
    from ecodiff_core.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("error:") == 1 and "Traceback" not in err
