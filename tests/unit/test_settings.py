"""Settings dataclasses: checked when built (the engine's SettingsError, never a plain TypeError or
ValueError), one place for defaults (the command line reads them), forward-compatible loading."""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, replace

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ecodiff_core.embedded.demo import DemoSettings, RunSettings
from ecodiff_core.embedded.evaluation import EvalSettings
from ecodiff_core.embedded.recover_demo import RecoverDemoSettings
from ecodiff_core.embedded.text import TextEncoderConfig
from ecodiff_core.errors import EcoDiffError, MaskFileError, SettingsError
from ecodiff_core.hard_concrete import GateSettings
from ecodiff_core.learn_settings import LearnSettings
from ecodiff_core.maskfile import MaskState, load_mask, save_mask
from ecodiff_core.plan import PruneTarget
from ecodiff_core.recover import RecoverSettings
from ecodiff_core.units import Layout, Slice, UnitGroup
from ecodiff_core.validation import field_defaults

BAD = [
    (LearnSettings, dict(epochs=0), "epochs must be >= 1, got 0"),
    (LearnSettings, dict(epochs="4"), "epochs must be an integer, got '4'"),
    (LearnSettings, dict(accumulate=True), "accumulate must be an integer, got True"),
    (LearnSettings, dict(beta=None), "beta .* must be a number, got None"),
    (LearnSettings, dict(beta=math.nan), "beta .* must be a finite number >= 0, got nan"),
    (LearnSettings, dict(regularizer="l7"), "regularizer must be one of l1, sigmoid, l0, target, got 'l7'"),
    (LearnSettings, dict(lr=[0.1]), "lr must map unit kinds"),
    (LearnSettings, dict(lr={"head": "fast"}), "learning rate for head must be a number"),
    (LearnSettings, dict(lr={"blob": 0.1}), "unknown unit kind 'blob'"),
    (LearnSettings, dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    (LearnSettings, dict(gate={"temperature": 1.0}), "gate must be GateSettings, got dict"),
    (LearnSettings, dict(checkpointing="yes"), "checkpointing must be true or false"),
    (LearnSettings, dict(block_checkpointing="always"), "block_checkpointing must be one of"),
    (LearnSettings, dict(objective="local"), "objective must be one of end_to_end, per_step"),
    (LearnSettings, dict(seed=-1), "seed must be an integer in 0.."),
    (LearnSettings, dict(prompt_batch=0), r"prompt_batch \(calibration prompts per denoiser call\) must be >= 1"),
    (GateSettings, dict(temperature=0.0), "gate temperature must be a finite number > 0"),
    (GateSettings, dict(init_logit=math.inf), "gate init_logit must be a finite number, got inf"),
    (GateSettings, dict(gamma="-0.1"), "gate gamma must be a number"),
    (GateSettings, dict(zeta=0.9), "gamma < 0 and zeta > 1"),
    (GateSettings, dict(noise_offset=-1.0), "noise_offset must be a finite number >= 0"),
    (RecoverSettings, dict(rank=0), "rank must be in 1..4096, got 0"),
    (RecoverSettings, dict(rank=2.0), "rank must be an integer"),
    (RecoverSettings, dict(alpha="16"), "alpha must be a number"),
    (RecoverSettings, dict(lr=math.inf), "learning rate must be a finite number > 0"),
    (RecoverSettings, dict(seed=2**64), "seed must be an integer in 0.."),
    (RecoverSettings, dict(states="teacher"), "states must be one of pruned, original"),
    (EvalSettings, dict(per_class=0), "per_class must be >= 1"),
    (EvalSettings, dict(batch=None), "batch must be an integer"),
    (EvalSettings, dict(shift=0.0), "shift must be a finite number > 0"),
    (EvalSettings, dict(cfg=-1.0), "cfg must be a finite number >= 0"),
    (EvalSettings, dict(heldout=1), "heldout must be true or false"),
    (TextEncoderConfig, dict(dim=66), "dim 66 must be a multiple of heads"),
    (TextEncoderConfig, dict(layers=0), "text encoder layers must be >= 1"),
    (PruneTarget, dict(params=20), r"\[0, 0.95\], got 20"),
    (PruneTarget, dict(keep_ratios={"head": 0.0}), "fraction of heads to KEEP"),
    (DemoSettings, dict(steps=0), "steps must be >= 1, got 0"),
    (DemoSettings, dict(cfg=math.inf), "cfg must be a finite number >= 0"),
    (DemoSettings, dict(eval_per_class=1000), "eval_per_class must be <= 145"),
    (DemoSettings, dict(output=3), "the output must be a folder path"),
    (DemoSettings, dict(learn=None), "learn must be LearnSettings"),
    (RecoverDemoSettings, dict(steps=0), "state-steps must be >= 1, got 0"),
    (RecoverDemoSettings, dict(prompts_per_trajectory=-2), "prompts-per-trajectory must be >= 1"),
    (RecoverDemoSettings, dict(seed=-1), "seed must be an integer"),
    (RecoverDemoSettings, dict(mask="no/such/mask.safetensors"), "--mask no/such/mask.safetensors does not exist"),
    (RecoverDemoSettings, dict(recover=None), "recover must be RecoverSettings"),
]


@pytest.mark.parametrize("cls, change, message", BAD, ids=[f"{c.__name__}-{next(iter(d))}" for c, d, _ in BAD])
def test_bad_values_are_refused_when_built(cls, change, message):
    with pytest.raises(SettingsError, match=message) as refused:
        cls(**change)
    assert isinstance(refused.value, EcoDiffError)


@pytest.mark.parametrize("cls", [LearnSettings, GateSettings, RecoverSettings, EvalSettings, TextEncoderConfig])
def test_defaults_are_valid_and_round_trip(cls):
    default = cls()
    assert cls(**{k: v for k, v in asdict(default).items() if k != "gate"}) == replace(default)
    if hasattr(cls, "from_dict"):
        assert cls.from_dict(json.loads(json.dumps(asdict(default)))) == default


@pytest.mark.parametrize("cls", [DemoSettings, RecoverDemoSettings])
def test_embedded_run_settings_share_one_validation(cls, tmp_path):
    """The demo and LoRA Recover check their common settings with one implementation, each
    naming the setting its own way; a file as the output folder is refused by both."""
    assert issubclass(cls, RunSettings) and "validate" in RunSettings.__dict__
    (tmp_path / "a_file").write_text("x")
    for output in (tmp_path / "a_file", tmp_path / "a_file" / "inside"):
        with pytest.raises(SettingsError, match="is a file"):
            cls(output=output)
    settings = cls(output=str(tmp_path / "new"))
    assert settings.output == tmp_path / "new" and not settings.output.exists()


def test_changed_settings_are_checked_again():
    settings = LearnSettings()
    settings.epochs = 0
    with pytest.raises(SettingsError, match="epochs"):
        settings.validate()


# -- one place for the defaults ------------------------------------------------------------------
def parse(command: str) -> argparse.Namespace:
    from ecodiff_core import __main__ as cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    {"demo": cli._demo_parser, "recover": cli._recover_parser}[command](sub)
    return parser.parse_args([command])


@pytest.mark.parametrize("command, cls, flags", [
    ("demo", DemoSettings, {"sparsity": "sparsity", "steps": "steps", "prompts_per_class": "prompts_per_class",
                            "eval_per_class": "eval_per_class", "eval_steps": "eval_steps", "seed": "seed",
                            "output": "output"}),
    ("recover", RecoverDemoSettings, {"sparsity": "sparsity", "state_steps": "steps", "mask": "mask",
                                      "eval_per_class": "eval_per_class", "seed": "seed", "output": "output"}),
])
def test_command_line_defaults_are_the_settings_defaults(command, cls, flags):
    args, defaults = parse(command), field_defaults(cls)
    assert {flag: getattr(args, flag) for flag in flags} == {flag: defaults[name] for flag, name in flags.items()}
    if command == "demo":
        assert (args.epochs, args.beta) == (defaults["learn"].epochs, defaults["learn"].beta)


def test_field_defaults_do_not_build_the_settings(monkeypatch):
    monkeypatch.setattr(DemoSettings, "validate", lambda self: pytest.fail("built"))
    defaults = field_defaults(DemoSettings)
    assert defaults["learn"] == LearnSettings(epochs=8, accumulate=1, beta=0.01, regularizer="sigmoid",
                                              lr={"head": 0.1, "neuron": 0.1, "channel": 0.1}, objective="per_step",
                                              gate=GateSettings(init_logit=3.0, noise_offset=0.1))


# -- forward-compatible loading --------------------------------------------------------------------
def test_learn_settings_load_forward_compatibly(caplog):
    newer = {**LearnSettings(beta=0.2).to_dict(), "future_option": 3, "gate": {"temperature": 0.5, "later": 1}}
    with caplog.at_level(logging.INFO, logger="ecodiff"):
        loaded = LearnSettings.from_dict(newer)
    assert loaded == LearnSettings(beta=0.2, gate=GateSettings(temperature=0.5))
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "future_option" in logged and "later" in logged
    older = {"epochs": 2, "gate": {}}  # an older file: the rest take the defaults, but it learned end to end
    assert LearnSettings.from_dict(older) == LearnSettings(epochs=2, objective="end_to_end")
    with pytest.raises(SettingsError, match="epochs must be >= 1"):
        LearnSettings.from_dict({"epochs": 0})
    with pytest.raises(SettingsError, match="named settings"):
        LearnSettings.from_dict(["epochs", 2])


def mask_layout() -> Layout:
    return Layout(arch="toy", groups=(UnitGroup(name="b:units", kind="head", count=3, width=2, owner="b",
                                                gates=(Slice("b.out", "in"),)),))


def rewrite_settings(path, settings_json: str | None) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    if settings_json is None:
        del meta["settings"]
    else:
        meta["settings"] = settings_json
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("settings_json, expected", [
    # missing objective: learned before the per-step default, so end to end
    (None, LearnSettings(objective="end_to_end")),  # saved before settings were stored
    ('{"beta": 0.25}', LearnSettings(beta=0.25, objective="end_to_end")),  # older: missing keys take defaults
    ('{"beta": 0.25, "schedule_v2": {"a": 1}, "gate": {"init_logit": 1.0, "anneal": true}}',
     LearnSettings(beta=0.25, gate=GateSettings(init_logit=1.0), objective="end_to_end")),  # unknown keys ignored
])
def test_mask_settings_are_typed_and_load_forward_compatibly(tmp_path, settings_json, expected):
    layout = mask_layout()
    state = MaskState.fresh(layout, 3.0)
    assert state.settings == LearnSettings()
    state.settings = LearnSettings(epochs=2, gate=GateSettings(noise_offset=0.2))
    path = save_mask(tmp_path / "m.safetensors", state)
    assert load_mask(path, layout).settings == state.settings
    rewrite_settings(path, settings_json)
    loaded = load_mask(path, layout)
    assert isinstance(loaded.settings, LearnSettings) and loaded.settings == expected


@pytest.mark.parametrize("settings_json", ['{"epochs": -1}', '[1, 2]', '{"gate": {"zeta": 0.5}}', '{"lr": 3}'])
def test_mask_with_bad_settings_is_a_damaged_file(tmp_path, settings_json):
    layout = mask_layout()
    path = save_mask(tmp_path / "m.safetensors", MaskState.fresh(layout, 3.0))
    rewrite_settings(path, settings_json)
    with pytest.raises(MaskFileError, match="damaged metadata"):
        load_mask(path, layout)


# -- the engine's own errors where plain ones leaked -----------------------------------------------
def _gate_values_missing():
    import torch

    from ecodiff_core.gate_hooks import GateController

    GateController(torch.nn.Linear(2, 2), mask_layout()).set({})


def _duplicate_groups():
    group = mask_layout().groups[0]
    Layout(arch="toy", groups=(group, group))


def _not_a_linear(path: str = "0"):
    import torch

    from ecodiff_core.units import get_linear

    get_linear(torch.nn.Sequential(torch.nn.ReLU()), path)


def _unknown_digit():
    from ecodiff_core.embedded.text import captions_for_class

    captions_for_class(10)


def _labels_for_other_images():
    import torch

    from ecodiff_core.embedded.judge import load_judge

    load_judge().evaluate(torch.zeros(3, 1, 8, 8), [1, 2])


def _cfg_without_uncond():
    from ecodiff_core.embedded.model import DefaultModel

    DefaultModel().denoiser_from_embeddings((None, None), None, cfg=2.0)


@pytest.mark.parametrize("call, kind, message", [
    (_gate_values_missing, EcoDiffError, "no gate values for 1 groups"),
    (_duplicate_groups, EcoDiffError, "duplicate group names"),
    (_not_a_linear, EcoDiffError, "a ReLU, expected nn.Linear"),
    (lambda: _not_a_linear("1.proj"), EcoDiffError, "'1.proj', which Sequential does not have"),
    (_unknown_digit, SettingsError, r"class must be in 0\.\.9, got 10"),
    (_labels_for_other_images, SettingsError, "3 images but 2 labels"),
    (_cfg_without_uncond, SettingsError, "needs the unconditional embeddings"),
])
def test_engine_raises_its_own_errors(call, kind, message):
    with pytest.raises(kind, match=message):
        call()
