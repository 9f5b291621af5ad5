"""The settings of mask learning: the one place for their defaults and their checks.

Every host takes its defaults from :class:`LearnSettings` (the command line, the nodes); a mask file
stores them and loads them forward-compatibly (:meth:`LearnSettings.from_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from .block_checkpoint import MODES as BLOCK_MODES
from .errors import SettingsError
from .hard_concrete import REGULARIZERS, GateSettings, always_open_logit
from .seeds import check_seed
from .units import UNIT_KINDS
from .validation import check_choice, check_int, check_number, known_fields

Objective = Literal["end_to_end", "per_step"]
OBJECTIVES: tuple[str, ...] = ("end_to_end", "per_step")
TARGET = "target"  # the regularizer that learns for a stated target (see ``target_constraint``)
TARGET_MODES: tuple[str, ...] = ("params", "flops")
MAX_TARGET = 0.95  # as PruneTarget: at most this fraction removed


@dataclass
class LearnSettings:
    """Defaults follow the official SDXL run (β = 0.5 with mean |λ|, AdamW, 4 epochs, accumulation 4),
    with the recipe measured best on the embedded model (docs/benchmarks.md, "Learning that earns its
    cost"): the per-step objective and one learning rate, 0.1, for every unit kind (the official FLUX
    run gives heads and channels 0.5).  ``objective="end_to_end"`` is the official objective.

    epochs               passes over the calibration prompts (≥ 1).
    accumulate           prompts (trajectories) per optimiser step (≥ 1).
    beta                 weight β of the sparsity regulariser (finite, ≥ 0; unused by "target").
    regularizer          "l1", "sigmoid" or "l0" (see ``hard_concrete.regularizer``), or "target":
                         hold the expected removed cost of the gates at ``target`` with learned
                         Lagrange multipliers (see ``target_constraint``; no β).  "target" needs the
                         textbook gates, ``gate.noise_offset`` = 0 (:meth:`for_target` sets them).
    target               "target" only: the fraction of parameters (or FLOPs) to remove, (0, 0.95],
                         as Apply's ``PruneTarget``.
    target_mode          "target" only: "params" or "flops" (FLOPs of one denoiser call).
    target_warmup        "target" only: the fraction of the learning steps over which the target
                         ramps linearly from 0 ([0, 1]; 0 = the full target from the first step).
    multiplier_lr        "target" only: the gradient-ascent step of the linear multiplier λ₁ (> 0).
    penalty_lr           "target" only: the gradient-ascent step of the quadratic multiplier λ₂ (> 0);
                         much larger than ``multiplier_lr``, it damps the oscillation of the expected
                         sparsity around the target (AdamW makes the logits' steps blind to the
                         multipliers' common scale, so only their ratio shapes the dynamics).
    lr                   AdamW learning rate per unit kind ("head", "neuron", "channel"; each > 0).
    weight_decay         AdamW weight decay on the logits (finite, ≥ 0).
    gate                 the hard-concrete gates (:class:`GateSettings`).
    checkpointing        time-step checkpointing of the trajectory gradient (memory of one step).
    block_checkpointing  "auto", "on" or "off": recompute transformer blocks in the backward.
    objective            "end_to_end" (the final latent) or "per_step" (each step's x0).
    warm_start           the fraction of the epochs learned first with the per-step objective (a
                         cheaper, denser signal): the first ⌊warm_start × epochs⌋, the rest with
                         ``objective`` ([0, 1]; 0 = none).  :attr:`warm_start_epochs` is that count.
    seed                 seeds the prompt order and the gate noise (0..2**64-1).
    prompt_batch         calibration samples per denoiser call (they share each step's gate sample);
                         1 = one by one (≥ 1).

    Every value is checked when the settings are built (SettingsError naming it).
    """

    epochs: int = 4
    accumulate: int = 4
    beta: float = 0.5
    regularizer: str = "l1"
    lr: dict[str, float] = field(default_factory=lambda: {"head": 0.1, "neuron": 0.1, "channel": 0.1})
    weight_decay: float = 0.01
    gate: GateSettings = field(default_factory=GateSettings)
    checkpointing: bool = True
    block_checkpointing: str = "auto"
    objective: Objective = "per_step"
    seed: int = 0
    # calibration samples per denoiser call (they share each step's gate sample); 1 = one by one
    prompt_batch: int = 1
    warm_start: float = 0.0
    target: float = 0.5
    target_mode: str = "params"
    target_warmup: float = 0.5
    multiplier_lr: float = 1.0
    penalty_lr: float = 100.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """SettingsError naming the first bad setting (run again after changing a field in place)."""
        check_int("epochs", self.epochs)
        check_int("accumulate", self.accumulate)
        check_number("beta (sparsity weight)", self.beta)
        check_choice("regularizer", self.regularizer, (*REGULARIZERS, TARGET))
        if not isinstance(self.lr, dict):
            raise SettingsError(f"lr must map unit kinds to learning rates, e.g. {{'head': 0.1}}, got {self.lr!r}")
        for kind, lr in self.lr.items():
            if kind not in UNIT_KINDS:
                raise SettingsError(
                    f"learning rate given for unknown unit kind '{kind}'; kinds: {', '.join(UNIT_KINDS)}"
                )
            check_number(f"learning rate for {kind}", lr, strict=True)
        check_number("weight_decay", self.weight_decay)
        if not isinstance(self.gate, GateSettings):
            raise SettingsError(f"gate must be GateSettings, got {type(self.gate).__name__}")
        if not isinstance(self.checkpointing, bool):
            raise SettingsError(f"checkpointing must be true or false, got {self.checkpointing!r}")
        check_choice("block_checkpointing", self.block_checkpointing, BLOCK_MODES)
        check_choice("objective", self.objective, OBJECTIVES)
        check_seed(self.seed)
        check_int("prompt_batch (calibration prompts per denoiser call)", self.prompt_batch)
        if check_number("warm_start (fraction of the epochs)", self.warm_start) > 1:
            raise SettingsError(f"warm_start is the fraction of the epochs learned with the per-step loss first and "
                                f"must lie in [0, 1], got {self.warm_start!r}")
        if self.warm_start > 0 and self.objective == "per_step":
            raise SettingsError(f"warm_start {self.warm_start:g} learns the first epochs per step before the "
                                "end-to-end objective; with objective 'per_step' every epoch is per step already: "
                                "set objective 'end_to_end' or warm_start 0")
        self._validate_target()

    @property
    def warm_start_epochs(self) -> int:
        """The epochs learned with the per-step objective before ``objective`` (⌊warm_start × epochs⌋)."""
        return math.floor(self.warm_start * self.epochs + 1e-9)

    def _validate_target(self) -> None:
        target = check_number("target (fraction to remove)", self.target, strict=True)
        if target > MAX_TARGET:
            hint = f" (a fraction, not percent: did you mean {target / 100:g}?)" if 1 < target <= 95 else ""
            raise SettingsError(f"target is the fraction of parameters (or FLOPs) to remove and must lie in "
                                f"(0, {MAX_TARGET}], got {target!r}{hint}")
        check_choice("target_mode", self.target_mode, TARGET_MODES)
        warmup = check_number("target_warmup (fraction of the steps)", self.target_warmup)
        if warmup > 1:
            raise SettingsError(f"target_warmup is a fraction of the learning steps and must lie in [0, 1], "
                                f"got {warmup!r}")
        check_number("multiplier_lr (step of the linear Lagrange multiplier)", self.multiplier_lr, strict=True)
        check_number("penalty_lr (step of the quadratic Lagrange multiplier)", self.penalty_lr, strict=True)
        if self.regularizer == TARGET and self.gate.noise_offset != 0:
            raise SettingsError(
                f"regularizer 'target' needs the textbook hard-concrete gates: with gate noise_offset "
                f"{self.gate.noise_offset:g} a gate whose logit is above {always_open_logit(self.gate):.2f} is never "
                "zero, so its expected cost gives no gradient; set gate noise_offset to 0 (LearnSettings.for_target "
                "builds such settings)")

    @classmethod
    def for_target(cls, target: float, target_mode: str = "params", **fields) -> LearnSettings:
        """Settings that learn for ``target`` (regularizer "target", textbook gates δ = 0); ``fields``
        override any other setting (a given ``gate`` is taken with its noise_offset set to 0)."""
        gate = fields.pop("gate", GateSettings())
        if isinstance(gate, GateSettings):
            gate = dataclasses.replace(gate, noise_offset=0.0)
        return cls(regularizer=TARGET, target=target, target_mode=target_mode, gate=gate, **fields)

    def to_dict(self) -> dict:
        """JSON-able: every field, ``gate`` as a nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LearnSettings:
        """The inverse of :meth:`to_dict`, forward-compatible (as peft's configs load): keys a newer
        version wrote are ignored with a log line, missing keys take the defaults (``gate`` too), except
        ``objective``: settings written before the per-step default were learned end to end.
        SettingsError for values out of range or of the wrong type."""
        values = {"objective": "end_to_end", **known_fields(cls, data)}
        if "gate" in values:
            values["gate"] = GateSettings.from_dict(values["gate"])
        return cls(**values)
