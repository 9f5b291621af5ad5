"""Full-size ComfyUI SDXL and FLUX.1-dev on one GPU: memory and time of mask learning, and sampling
time of pruned models.  Prints a Markdown table.

The models are ComfyUI's own classes (``comfy.supported_models.SDXL`` / ``Flux`` → ``model_base``)
with the published configs (as ComfyUI's model detection gives them), built directly on the device
with random weights: nothing is downloaded.  Weights are bf16, or fp8 e4m3fn computed in bf16
through ComfyUI's manual cast (what UNETLoader's ``weight_dtype`` gives).  Each step calls
``model_base.apply_model`` as ComfyUI's sampler does (SDXL with CFG, batch 2; FLUX.1-dev guidance-
distilled, batch 1), so times exclude only ComfyUI's sampler wrappers.  At 1024² and T = 20 Euler
steps it measures, per model and weight dtype:

- peak device memory of one learning trajectory (one prompt, time-step checkpointing) without and
  with block checkpointing (total allocated, weights included);
- seconds per learning trajectory (one optimiser step of ``MaskLearner``) and its ratio to one
  inference trajectory of the same model;
- seconds per inference trajectory of the model pruned by 20 % of its parameters (random logits),
  with kept features aligned to 8 (``PruneTarget.align``) and unaligned, against the original.

One run of the defaults takes a few minutes on one H200 (budget: 8).  ``--device cpu --tiny`` runs
the same code on tiny configs in well under a minute (the integration test does, so this cannot rot):

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_fullsize.py
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_fullsize.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: the repository root is where `scripts` and `ecodiff_core` are
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecodiff_core import saved_tensors  # noqa: E402
from ecodiff_core.archs import find_layout  # noqa: E402
from ecodiff_core.learn import CalibrationSample, LearnSettings, MaskLearner  # noqa: E402
from ecodiff_core.memory import LiveBytes, weight_bytes  # noqa: E402
from ecodiff_core.plan import PruneTarget, plan_pruning  # noqa: E402
from ecodiff_core.prune import prune_model  # noqa: E402
from ecodiff_core.trajectory import sample  # noqa: E402
from scripts.comfy_env import prepare_import  # noqa: E402

GB = 1e9
ALIGN = 8
SPARSITY = 0.2
# ComfyUI's model detection for the published checkpoints (comfy/model_detection.py)
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False}
FLUX_DEV = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
            "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True}
# the same classes, tiny: for --tiny (CPU) runs of this very code
SDXL_TINY = dict(SDXL, model_channels=64, num_res_blocks=[1, 1], transformer_depth=[0, 1], channel_mult=[1, 2],
                 transformer_depth_middle=1, context_dim=64, adm_in_channels=32 + 6 * 256,
                 transformer_depth_output=[0, 0, 1, 1])
FLUX_TINY = dict(FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=64, num_heads=4, depth=1,
                 depth_single_blocks=2, axes_dim=[4, 6, 6])


@dataclass(frozen=True)
class Arch:
    """A published model: ComfyUI config class, config, text tokens, CFG scale and pooled width."""

    name: str
    config_class: str
    config: dict
    tokens: int
    cfg: float  # 1.0: no CFG batch (FLUX.1-dev is guidance-distilled)
    adm: int  # width of ``y`` (SDXL's ADM vector, FLUX's pooled CLIP vector)
    scheduler: str = "normal"


def archs(tiny: bool) -> list[Arch]:
    if tiny:
        return [Arch("SDXL", "SDXL", SDXL_TINY, 6, 5.0, SDXL_TINY["adm_in_channels"]),
                Arch("FLUX.1-dev", "Flux", FLUX_TINY, 6, 1.0, FLUX_TINY["vec_in_dim"], "simple")]
    return [Arch("SDXL", "SDXL", SDXL, 77, 5.0, SDXL["adm_in_channels"]),
            Arch("FLUX.1-dev", "Flux", FLUX_DEV, 512, 1.0, FLUX_DEV["vec_in_dim"], "simple")]


WEIGHTS = {"bf16": (torch.bfloat16, None), "fp8": (torch.float8_e4m3fn, torch.bfloat16)}


def bootstrap(device: torch.device) -> None:
    """Make ComfyUI importable from COMFYUI_PATH (CPU mode for --device cpu)."""
    try:
        prepare_import()
    except RuntimeError as e:
        sys.exit(f"{e} (the benchmark runs ComfyUI's own model classes)")
    from comfy.cli_args import args

    if device.type == "cpu":
        args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)


@torch.no_grad()
def random_fill(module: torch.nn.Module, seed: int) -> None:
    """Random weights of a moderate scale, drawn on the parameter's device in the compute dtype and
    stored in the parameter's own dtype (fp8 included); ComfyUI's ops leave them uninitialised."""
    gen: dict[torch.device, torch.Generator] = {}
    for name, p in list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers()
                                                       if b.is_floating_point()]:
        g = gen.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
        work = torch.float32 if p.dtype in (torch.float32, torch.float64) else torch.bfloat16
        value = torch.randn(p.shape, generator=g, device=p.device, dtype=work)
        if p.ndim >= 2:
            value /= math.sqrt(p[0].numel())
        elif name.endswith(("scale", "weight")) and "norm" in name.lower():
            value = 1.0 + 0.1 * value
        else:
            value *= 0.02
        p.copy_(value.to(p.dtype))


def build(arch: Arch, weights: str, device: torch.device) -> Any:
    """ComfyUI's ``model_base`` model of ``arch`` on ``device`` with random ``weights``."""
    import comfy.supported_models as sm

    weight_dtype, cast = WEIGHTS[weights]
    config = getattr(sm, arch.config_class)(dict(arch.config))
    config.set_inference_dtype(weight_dtype, cast)
    model = config.get_model({}, "", device=device)
    random_fill(model.diffusion_model, 0)
    model.model_sampling.to(device)
    return model.eval()


@dataclass
class Problem:
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    noise: torch.Tensor
    sigmas: torch.Tensor


def problem(model: Any, arch: Arch, size: int, steps: int, device: torch.device) -> Problem:
    """One prompt's x0 denoiser through ``model.apply_model`` (CFG batch inside), x_T and σ."""
    import comfy.samplers

    g = torch.Generator(device).manual_seed(1)
    n = 2 if arch.cfg != 1.0 else 1
    context_dim = arch.config.get("context_dim") or arch.config["context_in_dim"]
    context = torch.randn(n, arch.tokens, context_dim, generator=g, device=device)
    extra: dict[str, Any] = {"y": torch.randn(n, arch.adm, generator=g, device=device)}
    if arch.config.get("guidance_embed"):
        extra["guidance"] = torch.full((n,), 3.5, device=device)
    channels = arch.config["in_channels"]
    x_t = torch.randn(1, channels, size // 8, size // 8, generator=g, device=device)
    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, arch.scheduler, steps).to(device)
    ms = model.model_sampling

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = torch.cat([x] * n)
        x0 = model.apply_model(batch, sigma.reshape(1).expand(n), c_crossattn=context, **extra)
        if n == 1:
            return x0
        cond, uncond = x0.chunk(2)
        return uncond + arch.cfg * (cond - uncond)

    return Problem(denoise, ms.noise_scaling(sigmas[0], x_t, torch.zeros_like(x_t), max_denoise=True), sigmas)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device, module: torch.nn.Module) -> Iterator[dict]:
    """``{"peak": bytes}`` after the block: the device's peak allocation (weights included) on
    CUDA, elsewhere the weights plus the peak of tensors created inside (``memory.LiveBytes``)."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device)
    else:
        with LiveBytes() as counter:
            yield out
        out["peak"] = weight_bytes(module) + counter.peak


def timed(device: torch.device, run: Callable[[], Any]) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def grad_context():
    """FLUX's in-place residual adds: autograd keeps copies of mutated saved tensors (as the host)."""
    return saved_tensors.allow_mutation_on_saved_tensors()


def learning_trajectory(model: Any, p: Problem, target: torch.Tensor, block_checkpointing: str,
                        device: torch.device) -> tuple[float, int]:
    """Seconds and peak bytes of one learning trajectory (one optimiser step on one prompt)."""
    module = model.diffusion_model
    settings = LearnSettings(epochs=1, accumulate=1, block_checkpointing=block_checkpointing)
    learner = MaskLearner(module, find_layout(module), settings, grad_context=grad_context)
    with peak_memory(device, module) as mem:
        seconds, state = timed(device, lambda: learner.learn([CalibrationSample(p.denoise, p.noise, target)],
                                                             p.sigmas))
    if state.stop_reason:
        raise RuntimeError(f"learning stopped: {state.stop_reason}")
    return seconds, mem["peak"]


def random_logits(layout: Any, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {gr.name: torch.randn(gr.count, generator=g) for gr in layout.groups}


def pruned_sampling(model: Any, p: Problem, align: int, device: torch.device) -> tuple[float, float, bool]:
    """(seconds per inference trajectory, removed fraction, every cut Linear aligned) of ``model``
    pruned by SPARSITY of its parameters with ``align``; the model is put back as it was."""
    original = model.diffusion_model
    layout = find_layout(original)
    plan = plan_pruning(original, layout, random_logits(layout, device), PruneTarget(params=SPARSITY, align=align))
    pruned = prune_model(original, layout, plan.keep)
    aligned = all(int(plan.keep[g.name].sum()) * g.width % ALIGN == 0 or bool(plan.keep[g.name].all())
                  for g in layout.groups)
    try:
        model.diffusion_model = pruned
        sample(p.denoise, p.noise, p.sigmas[:2])  # warm-up: kernels for the new shapes
        seconds, _ = timed(device, functools.partial(sample, p.denoise, p.noise, p.sigmas))
    finally:
        model.diffusion_model = original
        del pruned
    return seconds, plan.removed_fraction, aligned


@dataclass
class Row:
    model: str
    weights: str
    weight_gb: float
    values: dict[str, float] = field(default_factory=dict)


def measure(arch: Arch, weights: str, size: int, steps: int, device: torch.device, log: Callable[[str], None]) -> Row:
    model = build(arch, weights, device)
    module = model.diffusion_model
    row = Row(arch.name, weights, weight_bytes(module) / GB)
    p = problem(model, arch, size, steps, device)
    sample(p.denoise, p.noise, p.sigmas[:2])  # warm-up
    row.values["infer_s"], target = timed(device, functools.partial(sample, p.denoise, p.noise, p.sigmas))
    log(f"{arch.name} {weights}: inference trajectory {row.values['infer_s']:.2f} s")
    for mode in ("off", "on"):
        seconds, peak = learning_trajectory(model, p, target, mode, device)
        row.values[f"learn_{mode}_s"], row.values[f"peak_{mode}_gb"] = seconds, peak / GB
        log(f"{arch.name} {weights}: learning, block checkpointing {mode}: {seconds:.2f} s, peak {peak / GB:.2f} GB")
    for align in (ALIGN, 1):
        seconds, removed, aligned = pruned_sampling(model, p, align, device)
        if align == ALIGN and not aligned:
            raise RuntimeError(f"a pruned group of {arch.name} is not aligned to {ALIGN} features")
        row.values[f"pruned{align}_s"], row.values[f"removed{align}"] = seconds, removed
        log(f"{arch.name} {weights}: pruned −{removed:.1%} (align {align}): {seconds:.2f} s per trajectory")
    del model, module, p, target
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


COLUMNS = ("model", "weights", "weights GB", "learn peak GB, plain", "learn peak GB, block ckpt",
           "learn s, plain", "learn s, block ckpt", "infer s", "learn / infer", "pruned −20 % s, align 8",
           "pruned −20 % s, unaligned", "speed-up align 8", "speed-up unaligned")


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        v = r.values
        cells = [r.model, r.weights] + [f"{x:.3g}" for x in (
            r.weight_gb, v["peak_off_gb"], v["peak_on_gb"], v["learn_off_s"], v["learn_on_s"], v["infer_s"],
            v["learn_off_s"] / v["infer_s"], v["pruned8_s"], v["pruned1_s"], v["infer_s"] / v["pruned8_s"],
            v["infer_s"] / v["pruned1_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (a CPU smoke run)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (1024; --tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps T (20; --tiny: 2)")
    parser.add_argument("--models", nargs="+", default=["SDXL", "FLUX.1-dev"])
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or use --device cpu --tiny for a smoke run")
    size = args.size or (32 if args.tiny else 1024)
    steps = args.steps or (2 if args.tiny else 20)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: intra-op threads only contend
    bootstrap(device)
    torch.manual_seed(0)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    rows = [measure(arch, weights, size, steps, device, log)
            for arch in archs(args.tiny) if arch.name in args.models for weights in args.weights]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {size}×{size}, T = {steps}, one prompt; peak = device memory allocated, weights included\n")
    print(table(rows))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
