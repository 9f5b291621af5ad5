"""EcoDiff Learn Settings: the expert settings of Learn Sparsity Mask, as one optional input.

Every default is read from the engine's ``LearnSettings`` / ``GateSettings`` (one source of defaults):
a Learn node without this input learns with exactly those values.
"""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..ecodiff_core.errors import SettingsError
from ..ecodiff_core.hard_concrete import REGULARIZERS
from ..ecodiff_core.learn import LearnSettings
from ..ecodiff_core.learn_settings import OBJECTIVES
from .common import node_schema

LearnSettingsType = io.Custom("ECODIFF_LEARN_SETTINGS")
DEFAULTS = LearnSettings()
#: widget name → unit kind of ``LearnSettings.lr``
LR_WIDGETS = {"lr_heads": "head", "lr_neurons": "neuron", "lr_channels": "channel"}
#: widget name → field of ``GateSettings``
GATE_WIDGETS = {"gate_temperature": "temperature", "init_logit": "init_logit", "noise_offset": "noise_offset"}
#: widget names that are ``LearnSettings`` fields as they are
PLAIN_WIDGETS = ("accumulate", "regularizer", "weight_decay", "checkpointing", "block_checkpointing", "prompt_batch",
                 "objective", "warm_start")
EXPERT_WIDGETS = (*PLAIN_WIDGETS, *LR_WIDGETS, *GATE_WIDGETS)


def widget_defaults(settings: LearnSettings = DEFAULTS) -> dict[str, object]:
    """The value of every expert widget in ``settings`` (the engine's defaults unless given)."""
    return {**{name: getattr(settings, name) for name in PLAIN_WIDGETS},
            **{name: settings.lr[kind] for name, kind in LR_WIDGETS.items()},
            **{name: getattr(settings.gate, field) for name, field in GATE_WIDGETS.items()}}


def with_widgets(settings: LearnSettings, **widgets: object) -> LearnSettings:
    """``settings`` with the expert widgets given by name (see ``EXPERT_WIDGETS``) replaced; an
    unknown name is a SettingsError that lists the known ones."""
    unknown = sorted(set(widgets) - set(EXPERT_WIDGETS))
    if unknown:
        raise SettingsError(f"unknown learn setting(s) {', '.join(unknown)}; the EcoDiff Learn Settings node "
                            f"has {', '.join(EXPERT_WIDGETS)}")
    lr = {**settings.lr, **{LR_WIDGETS[n]: v for n, v in widgets.items() if n in LR_WIDGETS}}
    gate = dataclasses.replace(settings.gate, **{GATE_WIDGETS[n]: v for n, v in widgets.items() if n in GATE_WIDGETS})
    plain = {n: v for n, v in widgets.items() if n in PLAIN_WIDGETS}
    return dataclasses.replace(settings, lr=lr, gate=gate, **plain)


class LearnSettingsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = widget_defaults()
        return node_schema(
            node_id="EcoDiffLearnSettings", display_name="EcoDiff Learn Settings",
            description="Expert settings of Learn Sparsity Mask (connect to its 'settings' input). Without this "
                        "node Learn uses the same defaults: the recipe measured best (per-step objective, one "
                        "learning rate for every unit kind); objective end_to_end with learning rates 0.5 / 0.1 / "
                        "0.5 is the official FLUX run. Every input is optional (API prompts may give only the "
                        "ones they change).",
            inputs=[
                io.Int.Input("accumulate", default=d["accumulate"], optional=True, min=1, max=1000,
                             tooltip="Prompts per optimiser step (gradient accumulation)."),
                io.Combo.Input("regularizer", options=list(REGULARIZERS), default=d["regularizer"], optional=True,
                               tooltip="Sparsity penalty: l1 = mean |λ| (official SDXL), sigmoid = mean "
                                       "sigmoid(0.4λ+1) (official FLUX), l0 = expected fraction of open gates."),
                io.Float.Input("lr_heads", default=d["lr_heads"], optional=True, min=1e-6, max=10.0, step=0.01,
                               tooltip="AdamW learning rate of the attention-head logits."),
                io.Float.Input("lr_neurons", default=d["lr_neurons"], optional=True, min=1e-6, max=10.0, step=0.01,
                               tooltip="AdamW learning rate of the feed-forward neuron logits."),
                io.Float.Input("lr_channels", default=d["lr_channels"], optional=True, min=1e-6, max=10.0, step=0.01,
                               tooltip="AdamW learning rate of the FLUX modulation-channel logits (ignored for other "
                                       "models)."),
                io.Float.Input("weight_decay", default=d["weight_decay"], optional=True, min=0.0, max=10.0, step=0.001,
                               tooltip="AdamW weight decay of the logits."),
                io.Float.Input("gate_temperature", default=d["gate_temperature"], optional=True, min=0.01, max=10.0,
                               step=0.01,
                               tooltip="Hard-concrete temperature β: lower gives gates closer to 0/1 during learning."),
                io.Float.Input("init_logit", default=d["init_logit"], optional=True, min=-20.0, max=20.0, step=0.1,
                               tooltip="Initial logit λ₀ of every gate (3 = gates start almost surely open)."),
                io.Float.Input("noise_offset", default=d["noise_offset"], optional=True, min=0.0, max=10.0, step=0.01,
                               tooltip="Noise offset δ of the gates' logistic noise (official masking_eps); 0 = "
                                       "textbook hard concrete."),
                io.Boolean.Input("checkpointing", default=d["checkpointing"], optional=True,
                                 tooltip="Time-step gradient checkpointing: memory of one step whatever the step "
                                         "count, about one extra forward per step."),
                io.Combo.Input("block_checkpointing", options=["auto", "on", "off"], default=d["block_checkpointing"],
                               optional=True,
                               tooltip="Activation checkpointing per transformer/ResNet block inside each step: far "
                                       "less memory for about one extra forward. auto = on only when the memory check "
                                       "says the step would not fit otherwise."),
                io.Int.Input("prompt_batch", default=d["prompt_batch"], optional=True, min=1, max=64,
                             tooltip="Calibration prompts stacked into one denoiser call (1 = one by one). Faster on "
                                     "a GPU with memory to spare (the memory check counts each prompt's "
                                     "activations). The prompts of a batch share one gate sample per step, so the "
                                     "mask is not bit-identical to one by one, and changing it means learning again "
                                     "(it is part of the resume key). Prompts whose token counts differ run one by "
                                     "one."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default=d["objective"], optional=True,
                               tooltip="What the gated model must reproduce. per_step: the original's x0 at every "
                                       "step of its own trajectories (the default: measured best, cheaper). "
                                       "end_to_end: the final latent of the whole gated trajectory, back-propagated "
                                       "through every step (the paper's objective)."),
                io.Float.Input("warm_start", default=d["warm_start"], optional=True, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the epochs learned first with the per-step objective before "
                                       "end_to_end (0 = none; needs objective end_to_end)."),
            ],
            outputs=[LearnSettingsType.Output(display_name="settings",
                                              tooltip="Connect to Learn Sparsity Mask's 'settings' input.")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        settings = with_widgets(DEFAULTS, **widgets)
        settings.validate()
        return io.NodeOutput(settings)
