"""LoRA Recover on the embedded default model: prune, recover with a distilled LoRA, measure.

``python -m ecodiff_core recover`` runs :func:`run_recover`.  The mask is learned as the demo does
(or read from ``--mask``), the transformer is pruned to the requested parameter reduction, then a
LoRA on the pruned transformer is trained to match the original's x0 predictions.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..archs import find_layout
from ..errors import EcoDiffError, SettingsError
from ..learn import frozen_weights
from ..plan import PruneTarget, count_parameters
from ..recover import (
    DistillProblem,
    LoraRecoverer,
    LoraWeights,
    RecoverSettings,
    distillation_loss,
    lora_target_paths,
    rollout_states,
    teacher_targets,
)
from ..safetensors_file import write_atomic
from ..seeds import derived_seed
from .demo import RunSettings, calibration_samples, default_learn_settings, learn_mask, prune_to


@dataclass
class RecoverDemoSettings(RunSettings):
    """:class:`~.demo.RunSettings` (``steps``: the Euler steps of the calibration trajectories whose
    states LoRA Recover trains on) plus the mask to prune with (None: learn one as the demo does) and
    the recovery's own settings.  Messages name settings as the command line does (``state-steps``)."""

    sparsity: float = 0.5
    steps: int = 20
    mask: Path | None = None
    recover: RecoverSettings = field(default_factory=RecoverSettings)

    def label(self, name: str) -> str:
        return "state-steps" if name == "steps" else name.replace("_", "-")

    def validate(self) -> None:
        super().validate()
        if self.mask is not None and not (isinstance(self.mask, (str, os.PathLike)) and Path(self.mask).is_file()):
            raise SettingsError(f"--mask {self.mask} does not exist; give a mask file written by the demo")
        if not isinstance(self.recover, RecoverSettings):
            raise SettingsError(f"recover must be RecoverSettings, got {type(self.recover).__name__}")
        self.recover.validate()


def distill_problems(model, student, teacher, prompts: list[str], settings: RecoverDemoSettings,
                     sigmas: torch.Tensor, lora: LoraWeights) -> list[DistillProblem]:
    """States along the chosen model's trajectories (LoRA at zero), the teacher's x0 on them."""
    from .model import initial_noise

    problems = []
    for k, start in enumerate(range(0, len(prompts), settings.prompts_per_trajectory)):
        chunk = prompts[start:start + settings.prompts_per_trajectory]
        noise = initial_noise(len(chunk), derived_seed(settings.seed, 1000 + k))
        s_den = model.make_denoiser(chunk, settings.cfg, student)
        t_den = model.make_denoiser(chunk, settings.cfg, teacher)
        if settings.recover.states == "pruned":
            with lora.installed(student):
                states = rollout_states(s_den, noise, sigmas)
        else:
            states = rollout_states(t_den, noise, sigmas)
        sig = sigmas[:-1]
        problems.append(DistillProblem(s_den, states, sig, teacher_targets(t_den, states, sig)))
    return problems


def run_recover(settings: RecoverDemoSettings, progress: bool = True) -> dict[str, Any]:
    """Learn (or load) a mask → prune → evaluate → LoRA Recover → evaluate; report in ``settings.output``."""
    from tqdm.auto import tqdm

    from ..maskfile import load_mask, save_mask
    from .evaluation import EvalSettings, evaluate_model
    from .judge import load_judge
    from .model import load_default_model, sigmas
    from .text import calibration_prompts

    settings.validate()
    torch.manual_seed(settings.seed)
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    model, judge = load_default_model(), load_judge()
    transformer = model.transformer
    layout = find_layout(transformer)
    prompts, _ = calibration_prompts(settings.prompts_per_class)
    cpu0 = time.process_time()
    if settings.mask is not None:
        mask = load_mask(settings.mask, layout)
        logits, mask_settings, learn_seconds = mask.logits, mask.settings, 0.0
    else:
        samples = calibration_samples(model, prompts, settings.cfg, settings.prompts_per_trajectory, settings.seed)
        run = learn_mask(transformer, layout, replace(default_learn_settings(), seed=settings.seed), samples,
                         sigmas(10))
        logits, mask_settings, learn_seconds = run.state.logits, run.state.settings, run.seconds
        save_mask(out / "mask.safetensors", run.state)
    learn_cpu = time.process_time() - cpu0
    pruned, plan = prune_to(transformer, layout, logits, PruneTarget(params=settings.sparsity), settings=mask_settings)
    evaluation = EvalSettings(per_class=settings.eval_per_class, steps=settings.eval_steps, cfg=settings.cfg,
                              seed=settings.seed)
    original = evaluate_model(model, judge, evaluation)
    before = evaluate_model(model, judge, evaluation, transformer=pruned)

    rs = settings.recover
    paths = lora_target_paths(pruned, layout, rs.targets)
    lora = LoraWeights.for_module(pruned, paths, rs.rank, rs.alpha, rs.seed)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    with frozen_weights(pruned), frozen_weights(transformer):
        problems = distill_problems(model, pruned, transformer, prompts, settings, sigmas(settings.steps), lora)
        recoverer = LoraRecoverer(lora, rs, layout.arch, layout.fingerprint())
        with lora.installed(pruned):
            loss_before = distillation_loss(problems)
            with tqdm(total=rs.steps, desc="LoRA recover", unit="step", disable=not progress) as bar:
                def on_step(info) -> None:
                    bar.set_postfix(loss=f"{info.loss:.5f}")
                    bar.update(1)

                state = recoverer.train(problems, on_step)
            loss_after = distillation_loss(problems)
    recover_cpu, recover_wall = time.process_time() - cpu1, time.perf_counter() - wall1
    if state.stop_reason:
        raise EcoDiffError(f"recovery stopped early: {state.stop_reason}")
    with lora.installed(pruned), torch.no_grad():
        after = evaluate_model(model, judge, evaluation, transformer=pruned)
    write_atomic(out / "recover_lora.safetensors", lora.tensors(prefix=""),
                 {"rank": str(rs.rank), "alpha": str(rs.alpha), "targets": rs.targets})
    keys = ("accuracy", "confidence", "fd_judge")
    result = {
        "model": "embedded default (FluxTransformer2DModel, digits)",
        "target_param_reduction": settings.sparsity,
        "params_before": count_parameters(transformer),
        "params_after": count_parameters(pruned),
        "lora_params": sum(p.numel() for p in lora.parameters()),
        "lora_layers": len(paths),
        "original": {k: original[k] for k in keys},
        "pruned": {k: before[k] for k in keys},
        "recovered": {k: after[k] for k in keys},
        "distillation_loss_before_after": [loss_before, loss_after],
        "mask_learning_seconds": learn_seconds,
        "mask_learning_cpu_seconds": learn_cpu,
        "recover_cpu_seconds": recover_cpu,
        "recover_wall_seconds": recover_wall,
        "recover": rs.to_dict(),
        "state_steps": settings.steps,
        "evaluation": asdict(evaluation),
    }
    (out / "recover_report.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def summary_text(r: dict[str, Any]) -> str:
    o, b, a = r["original"], r["pruned"], r["recovered"]
    lb, la = r["distillation_loss_before_after"]
    return "\n".join([
        f"LoRA Recover on the {r['model']}",
        f"parameters      {r['params_before']:>10,} -> {r['params_after']:>10,}  "
        f"({1 - r['params_after'] / r['params_before']:.1%} removed) + LoRA {r['lora_params']:,} "
        f"on {r['lora_layers']} layers",
        "                original     pruned  recovered",
        f"judge accuracy  {o['accuracy']:>8.3f} {b['accuracy']:>10.3f} {a['accuracy']:>10.3f}",
        f"FD-judge        {o['fd_judge']:>8.2f} {b['fd_judge']:>10.2f} {a['fd_judge']:>10.2f}",
        f"distillation    loss {lb:.5f} -> {la:.5f}",
        f"recovery        {r['recover_cpu_seconds'] / 60:.2f} CPU-min ({r['recover_wall_seconds']:.0f} s wall); "
        f"mask learning {r['mask_learning_cpu_seconds'] / 60:.2f} CPU-min",
    ])
