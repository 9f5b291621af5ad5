"""The main job on the embedded default model: learn a mask, prune, and measure what it cost.

``python -m ecodiff_core demo`` runs :func:`run_demo`; the quality benchmark reuses the pieces.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..archs import find_layout
from ..errors import EcoDiffError, SettingsError
from ..flops import total_flops
from ..hard_concrete import GateSettings
from ..learn import CalibrationSample, LearnSettings, MaskLearner, StepInfo
from ..maskfile import MaskState, save_mask
from ..plan import PrunePlan, PruneTarget, count_parameters, plan_pruning
from ..prune import prune_model
from ..report import PruneReport
from ..seeds import check_seed, derived_seed
from ..units import Layout
from ..validation import check_int, check_number


def official_learn_settings() -> LearnSettings:
    """The official FLUX configuration (the default model is a FLUX transformer), end to end, 8 epochs.

    λ₀ = 3, δ = 0.1, mean sigmoid(0.4λ + 1) with β = 0.01, learning rates 0.5 / 0.1 / 0.5 for
    heads / neurons / modulation channels; unlike the official code, the channels get sparsity
    pressure too.  docs/benchmarks.md compares it with the alternatives that were tried.
    """
    return LearnSettings(
        epochs=8,
        accumulate=1,
        beta=0.01,
        regularizer="sigmoid",
        lr={"head": 0.5, "neuron": 0.1, "channel": 0.5},
        gate=GateSettings(init_logit=3.0, noise_offset=0.1),
        objective="end_to_end",
    )


def default_learn_settings() -> LearnSettings:
    """The demo's learning settings, the measured best on this model (docs/benchmarks.md, "Learning
    that earns its cost"): the official FLUX configuration with the per-step loss and one learning
    rate, 0.1, for every unit kind (the same 80 optimiser steps, about 0.7× the CPU time)."""
    return replace(official_learn_settings(), objective="per_step", lr={"head": 0.1, "neuron": 0.1, "channel": 0.1})


@dataclass
class RunSettings:
    """What every run on the embedded model takes (the demo's and LoRA Recover's settings extend it).

    sparsity                fraction of parameters to remove (0..0.95).
    steps                   Euler steps of the calibration trajectories (≥ 1).
    cfg                     classifier-free guidance scale (finite, ≥ 0).
    prompts_per_class       calibration prompts per digit (≥ 1).
    prompts_per_trajectory  prompts batched into one trajectory (≥ 1).
    eval_per_class          evaluation images per digit (1..the real digits per class of the judge's
                            floor, 145).
    eval_steps              Euler steps when evaluating (≥ 1).
    seed                    0..2**64-1.
    output                  the output folder (created if missing; must not be a file).

    Checked when built (and by :meth:`validate` after changes): SettingsError naming the setting
    as :meth:`label` spells it.
    """

    sparsity: float = 0.2
    steps: int = 10
    cfg: float = 1.5
    prompts_per_class: int = 10
    prompts_per_trajectory: int = 10
    eval_per_class: int = 50
    eval_steps: int = 20
    seed: int = 0
    output: Path = Path("ecodiff_output")

    def __post_init__(self) -> None:
        self.validate()

    def label(self, name: str) -> str:
        """How messages name the setting ``name`` (the field name here)."""
        return name

    def validate(self) -> None:
        """SettingsError naming the first bad setting (numbers, then the output folder)."""
        from .data import NUM_CLASSES, load_digit_split

        PruneTarget(params=self.sparsity)
        check_seed(self.seed)
        for name in ("steps", "prompts_per_class", "prompts_per_trajectory", "eval_per_class", "eval_steps"):
            check_int(self.label(name), getattr(self, name))
        check_number(self.label("cfg"), self.cfg)
        available = int(torch.bincount(load_digit_split().train_labels, minlength=NUM_CLASSES).min())
        if self.eval_per_class > available:
            raise SettingsError(f"{self.label('eval_per_class')} must be <= {available} (real digits per class "
                                f"the FD-judge floor is measured on), got {self.eval_per_class}")
        if not isinstance(self.output, (str, os.PathLike)):
            raise SettingsError(f"the output must be a folder path, got {self.output!r}")
        self.output = out = Path(self.output)
        if out.exists() and not out.is_dir():
            raise SettingsError(f"the output {out} is a file, not a folder; give a folder path (it is created "
                                "if missing)")
        blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise SettingsError(f"cannot create the output folder {out}: {blocking} is a file")


@dataclass
class DemoSettings(RunSettings):
    """:class:`RunSettings` plus how the mask is learned (:func:`default_learn_settings`)."""

    learn: LearnSettings = field(default_factory=default_learn_settings)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.learn, LearnSettings):
            raise SettingsError(f"learn must be LearnSettings, got {type(self.learn).__name__}")
        self.learn.validate()


def calibration_samples(
    model, prompts: list[str], cfg: float, per_trajectory: int, seed: int
) -> list[CalibrationSample]:
    """Prompts batched into trajectories; each batch gets its own fixed x_T.  The samples are
    batchable (``LearnSettings.prompt_batch`` runs several trajectories as one batch)."""
    from .model import initial_noise

    samples = []
    build = model.batch_denoiser(cfg)
    for k, start in enumerate(range(0, len(prompts), per_trajectory)):
        chunk = prompts[start : start + per_trajectory]
        samples.append(CalibrationSample.batchable(build, model.conditioning(chunk, cfg),
                                                   initial_noise(len(chunk), derived_seed(seed, 1000 + k))))
    return samples


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class LearnRun:
    state: MaskState
    seconds: float
    peak_mb: float


def learn_mask(
    transformer: nn.Module,
    layout: Layout,
    settings: LearnSettings,
    samples: list[CalibrationSample],
    sigmas: torch.Tensor,
    on_step: Callable[[StepInfo], Any] | None = None,
) -> LearnRun:
    base = _rss_mb()
    start = time.perf_counter()
    state = MaskLearner(transformer, layout, settings).learn(samples, sigmas, callback=on_step)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if state.stop_reason:
        raise EcoDiffError(f"mask learning stopped early: {state.stop_reason}")
    return LearnRun(state, seconds, max(peak, 0.0))


def prune_to(
    transformer: nn.Module, layout: Layout, logits: dict[str, torch.Tensor], target: PruneTarget,
    settings: LearnSettings | None = None,
) -> tuple[nn.Module, PrunePlan]:
    """``settings``: the mask's recorded learning settings (ranking per kind, see ``plan.ranking_scores``)."""
    plan = plan_pruning(transformer, layout, logits, target, settings=settings)
    return prune_model(transformer, layout, plan.keep), plan


def forward_flops(model, transformer: nn.Module) -> int:
    """FLOPs of one transformer call on a CFG batch of 2 (one prompt)."""
    denoise = model.make_denoiser(["a handwritten seven"], 1.5, transformer)
    from .model import initial_noise

    x = initial_noise(1, 0)
    with torch.no_grad():
        return total_flops(lambda: denoise(x, torch.tensor(0.5)))


def image_grid(columns: list[tuple[str, torch.Tensor]], per_class: int, scale: int = 6):
    """A labelled PIL image: for each labelled image set, ``per_class`` samples of digits 0–9 in rows."""
    from PIL import Image, ImageDraw

    size, pad = 8 * scale, 2
    pitch = size + pad
    gap, header = size // 2, 16
    block = per_class * pitch
    canvas = Image.new("L", (len(columns) * block + (len(columns) - 1) * gap, header + 10 * pitch), 255)
    draw = ImageDraw.Draw(canvas)
    for c, (label, images) in enumerate(columns):
        x0 = c * (block + gap)
        draw.text((x0 + 2, 2), label, fill=0)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        stride = images.shape[0] // 10
        for digit in range(10):
            for k in range(per_class):
                tile = Image.fromarray(pixels[digit * stride + k, 0].numpy()).resize((size, size), Image.NEAREST)
                canvas.paste(tile, (x0 + k * pitch, header + digit * pitch))
    return canvas


def run_demo(settings: DemoSettings, progress: bool = True) -> dict[str, Any]:
    """Learn → prune → evaluate both models with the same seeds → grid and report in ``settings.output``."""
    from tqdm.auto import tqdm

    from .evaluation import EvalSettings, evaluate_model, evaluation_prompts, generate
    from .judge import load_judge, real_data_floor
    from .model import load_default_model, sigmas
    from .text import calibration_prompts

    settings.validate()
    torch.manual_seed(settings.seed)
    out = Path(settings.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    model, judge = load_default_model(), load_judge()
    transformer = model.transformer
    layout = find_layout(transformer)
    prompts, _ = calibration_prompts(settings.prompts_per_class)
    samples = calibration_samples(model, prompts, settings.cfg, settings.prompts_per_trajectory, settings.seed)
    learn_settings = replace(settings.learn, seed=settings.seed)
    total_steps = learn_settings.epochs * -(-len(samples) // learn_settings.accumulate)
    with tqdm(total=total_steps, desc="learning mask", unit="step", disable=not progress) as bar:

        def on_step(info: StepInfo) -> None:
            bar.set_postfix(loss=f"{info.loss:.4f}", closed=" ".join(f"{k}:{v:.0%}" for k, v in info.sparsity.items()))
            bar.update(1)

        run = learn_mask(transformer, layout, learn_settings, samples, sigmas(settings.steps), on_step)
    save_mask(out / "mask.safetensors", run.state)
    pruned, plan = prune_to(transformer, layout, run.state.logits, PruneTarget(params=settings.sparsity),
                            settings=run.state.settings)

    evaluation = EvalSettings(
        per_class=settings.eval_per_class, steps=settings.eval_steps, cfg=settings.cfg, seed=settings.seed
    )
    before = evaluate_model(model, judge, evaluation)
    after = evaluate_model(model, judge, evaluation, transformer=pruned)
    flops_before, flops_after = forward_flops(model, transformer), forward_flops(model, pruned)
    report = PruneReport.build(transformer, pruned, layout, plan.keep, flops_before, flops_after)
    n_images = 10 * settings.eval_per_class
    result = {
        "model": "embedded default (FluxTransformer2DModel, digits)",
        "target_param_reduction": settings.sparsity,
        "params_before": count_parameters(transformer),
        "params_after": count_parameters(pruned),
        "flops_per_call_before": flops_before,
        "flops_per_call_after": flops_after,
        "judge_before": {k: before[k] for k in ("accuracy", "confidence", "fd_judge")},
        "judge_after": {k: after[k] for k in ("accuracy", "confidence", "fd_judge")},
        "fd_judge_real_floor": real_data_floor(judge, n=n_images),
        "learning_seconds": run.seconds,
        "learning_peak_rss_increase_mb": run.peak_mb,
        "sampling_seconds_per_image_before": before["sample_seconds"] / n_images,
        "sampling_seconds_per_image_after": after["sample_seconds"] / n_images,
        "evaluation": asdict(evaluation),
        "learning": {
            **learn_settings.to_dict(),
            "steps": settings.steps,
            "cfg": settings.cfg,
            "prompts": len(prompts),
            "trajectories_per_epoch": len(samples),
        },
        "loss_first_last": [run.state.history[0]["loss"], run.state.history[-1]["loss"]],
        "prune_report": report.to_dict(),
    }
    show = min(settings.eval_per_class, 8)
    grid_prompts, _ = evaluation_prompts(show)
    grid_eval = replace(evaluation, per_class=show)
    grid = image_grid(
        [
            ("original", generate(model, grid_prompts, grid_eval)),
            (f"pruned -{settings.sparsity:.0%} params", generate(model, grid_prompts, grid_eval, pruned)),
        ],
        per_class=show,
    )
    grid.save(out / "compare.png")
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "report.txt").write_text(summary_text(result) + "\n\n" + report.to_text() + "\n")
    return result


def summary_text(r: dict[str, Any]) -> str:
    b, a = r["judge_before"], r["judge_after"]
    lines = [
        f"EcoDiff demo on the {r['model']}",
        f"parameters      {r['params_before']:>10,} -> {r['params_after']:>10,}  "
        f"({1 - r['params_after'] / r['params_before']:.1%} removed, target {r['target_param_reduction']:.0%})",
        f"FLOPs per call  {r['flops_per_call_before']:>10,} -> {r['flops_per_call_after']:>10,}  "
        f"({1 - r['flops_per_call_after'] / r['flops_per_call_before']:.1%} fewer)",
        f"judge accuracy  {b['accuracy']:>10.3f} -> {a['accuracy']:>10.3f}",
        f"FD-judge        {b['fd_judge']:>10.2f} -> {a['fd_judge']:>10.2f}  "
        f"(real-data floor at this sample size: {r['fd_judge_real_floor']:.2f})",
        f"sampling s/img  {r['sampling_seconds_per_image_before']:>10.4f} -> "
        f"{r['sampling_seconds_per_image_after']:>10.4f}",
        f"learning        {r['learning_seconds']:.1f} s, peak RSS +{r['learning_peak_rss_increase_mb']:.0f} MB, "
        f"loss {r['loss_first_last'][0]:.4f} -> {r['loss_first_last'][1]:.4f}",
    ]
    return "\n".join(lines)
