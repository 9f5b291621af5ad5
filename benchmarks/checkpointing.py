"""Peak memory and cost of one learning trajectory, with and without time-step checkpointing.

Runs each measurement in a fresh process (peak RSS is per process) on a random SDXL-shaped diffusers
UNet with CFG, and prints a Markdown table:

    .venv/bin/python benchmarks/checkpointing.py [--steps 1 5 10 25 50] [--latent 32]

Memory: "peak increase" is the process's peak RSS minus its RSS after the model was built and one
inference trajectory ran (kernels and allocator pools warm); "process peak" is the peak RSS itself.
Cost is the wall time of one learning trajectory (no-grad rollout + per-step recompute and one VJP)
divided by one inference trajectory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: the repository root is where `ecodiff_core` is
    sys.path.insert(0, str(ROOT))

from ecodiff_core.archs import find_layout  # noqa: E402
from ecodiff_core.denoisers import EpsSchedule, unet_eps_denoiser  # noqa: E402
from ecodiff_core.learn import CalibrationSample, LearnSettings, MaskLearner  # noqa: E402
from ecodiff_core.trajectory import sample  # noqa: E402


def sdxl_shaped_unet():
    from ecodiff_core._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=128 + 6 * 32, norm_num_groups=32,
    ).eval()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(steps: int, mode: str, latent: int, threads: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    unet = sdxl_shaped_unet()
    g = torch.Generator().manual_seed(1)

    def conditioning():
        return {"encoder_hidden_states": torch.randn(1, 16, 128, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(1, 128, generator=g),
                                      "time_ids": torch.randn(1, 6, generator=g)}}

    schedule = EpsSchedule.scaled_linear()
    sigmas = schedule.karras(steps).float()
    denoise = unet_eps_denoiser(unet, schedule, conditioning(), conditioning(), cfg=5.0)
    noise = torch.randn(1, 4, latent, latent, generator=g) * sigmas[0]
    with torch.no_grad():
        sample(denoise, noise, sigmas[-2:])  # warm-up: lazy initialisation and allocator pools
        start = time.perf_counter()
        target = sample(denoise, noise, sigmas)
        infer_s = time.perf_counter() - start
    layout = find_layout(unet)
    learner = MaskLearner(unet, layout, LearnSettings(epochs=1, accumulate=1, checkpointing=mode == "checkpointed"))
    samples = [CalibrationSample(denoise, noise, target=target)]
    base = rss_mb()
    start = time.perf_counter()
    learner.learn(samples, sigmas)
    learn_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in unet.parameters())
    return {"steps": steps, "mode": mode, "peak_mb": peak - base, "peak_total_mb": peak, "learn_s": learn_s,
            "infer_s": infer_s,
            "params": params, "units": layout.total_units()}


def run_child(steps: int, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", str(steps), mode, "--latent", str(args.latent),
               "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_all(args: argparse.Namespace) -> list[dict]:
    """Every (T, mode); a full-graph run whose memory, extrapolated linearly from the previous one,
    would pass --max-gb is reported as skipped instead of swapping the machine to death."""
    rows = []
    for mode in args.modes:
        previous = None
        for steps in args.steps:
            if previous is not None and mode != "checkpointed":
                projected = previous["peak_mb"] / previous["steps"] * steps
                if projected > args.max_gb * 1024:
                    rows.append({**previous, "steps": steps, "skipped_projected_mb": projected})
                    continue
            row = run_child(steps, mode, args)
            rows.append(row)
            previous = row
            print(json.dumps(row), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["checkpointed", "full-graph"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip full-graph runs projected above this")
    parser.add_argument("--child", nargs=2, metavar=("STEPS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.latent, args.threads)))
        return
    rows = measure_all(args)
    first = rows[0]
    print(f"SDXL-shaped UNet2DConditionModel, {first['params'] / 1e6:.1f} M parameters, {first['units']} prunable "
          f"units, latent {args.latent}x{args.latent}, CFG (batch 2), fp32, {args.threads} threads\n")
    print("| T | mode | peak increase (MB) | process peak (MB) | learn (s) | inference (s) | learn / inference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped_projected_mb" in r:
            print(f"| {r['steps']} | {r['mode']} | skipped: ~{r['skipped_projected_mb']:.0f} projected | | | | |")
            continue
        print(f"| {r['steps']} | {r['mode']} | {r['peak_mb']:.0f} | {r['peak_total_mb']:.0f} | {r['learn_s']:.2f} "
              f"| {r['infer_s']:.2f} "
              f"| {r['learn_s'] / r['infer_s']:.2f} |")
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode and "skipped_projected_mb" not in r]
        if len(mine) > 1:
            first, last = mine[0], mine[-1]
            print(f"\n{mode}: from T={first['steps']} to T={last['steps']} the peak increase grows "
                  f"{last['peak_mb'] / max(first['peak_mb'], 1):.2f}x and the process peak "
                  f"{last['peak_total_mb'] / first['peak_total_mb']:.2f}x")


if __name__ == "__main__":
    main()
