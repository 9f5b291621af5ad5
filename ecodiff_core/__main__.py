"""Command line: ``python -m ecodiff_core demo [options]``."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .errors import EcoDiffError


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="learn a mask on the embedded default model, prune it, measure the cost",
                       description="Learn an EcoDiff mask end to end on the shipped digits model (FLUX "
                                   "architecture), prune it physically, and compare original and pruned "
                                   "with the shipped judge. Writes compare.png, report.txt, report.json and "
                                   "mask.safetensors to the output folder.")
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of parameters to remove (0-0.95)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps of each learning trajectory")
    p.add_argument("--epochs", type=int, default=8, help="passes over the calibration prompts")
    p.add_argument("--beta", type=float, default=None, help="weight of the sparsity regulariser")
    p.add_argument("--prompts-per-class", type=int, default=10, help="calibration prompts per digit")
    p.add_argument("--eval-per-class", type=int, default=50, help="evaluation images per digit")
    p.add_argument("--eval-steps", type=int, default=20, help="Euler steps when evaluating")
    p.add_argument("--output", type=Path, default=Path("ecodiff_output"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (the default model is small; 1 avoids oversubscription)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _memory_parser(sub: argparse._SubParsersAction) -> None:
    from .fullsize import ARCHS, WEIGHT_DTYPES

    p = sub.add_parser("memory", help="estimate the GPU memory of one learning step of a full-size model",
                       description="Trace one learning step (gated forward with grad + vector-Jacobian "
                                   "product) of a full-size model on the meta device (no download, no GPU) "
                                   "and print weights, activations and total in GB, with and without "
                                   "block checkpointing.")
    p.add_argument("--arch", required=True, choices=list(ARCHS), help="the published model")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels")
    p.add_argument("--batch", type=int, default=1, help="images per step")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance (doubles the batch)")
    p.add_argument("--weight-dtype", default="bf16", choices=list(WEIGHT_DTYPES), help="stored weight dtype")
    p.add_argument("--block-checkpointing", choices=("on", "off"), default=None,
                   help="show only this mode (default: both)")


def memory_command(args: argparse.Namespace) -> int:
    """``python -m ecodiff_core memory``: print the preflight's estimate for a full-size model."""
    from .fullsize import memory_table, step_memory

    mode = None if args.block_checkpointing is None else args.block_checkpointing == "on"
    # "off" also traces "on", to show what block checkpointing would save
    modes = (True,) if mode is True else (False, True)
    try:
        report = step_memory(args.arch, args.width, args.height, args.batch, args.cfg, args.weight_dtype, modes)
    except EcoDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(memory_table(report, mode))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecodiff_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _memory_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "memory":
        return memory_command(args)
    import torch

    from .demo import DemoSettings, run_demo, summary_text

    torch.set_num_threads(args.threads)

    settings = DemoSettings(sparsity=args.sparsity, steps=args.steps, prompts_per_class=args.prompts_per_class,
                            eval_per_class=args.eval_per_class, eval_steps=args.eval_steps, seed=args.seed,
                            output=args.output)
    learn = replace(settings.learn, epochs=args.epochs)
    if args.beta is not None:
        learn = replace(learn, beta=args.beta)
    settings.learn = learn
    try:
        result = run_demo(settings, progress=not args.no_progress)
    except EcoDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(result))
    print(f"\nwrote {settings.output / 'compare.png'}, report.txt, report.json, mask.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
