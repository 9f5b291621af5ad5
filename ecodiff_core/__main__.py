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


def _recover_parser(sub: argparse._SubParsersAction) -> None:
    from .recover import STATE_SOURCES, TARGET_MODULES, RecoverSettings

    d = RecoverSettings()
    p = sub.add_parser("recover", help="prune the embedded model, then recover quality with a distilled LoRA",
                       description="Learn (or load) an EcoDiff mask on the shipped digits model, prune it, train a "
                                   "LoRA on the pruned model that matches the original's x0 predictions along "
                                   "calibration trajectories (LoRA Recover), and judge original, pruned and "
                                   "recovered models. Writes recover_report.json and recover_lora.safetensors.")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of parameters to remove (0-0.95)")
    p.add_argument("--mask", type=Path, default=None, help="mask file to prune with (default: learn one)")
    p.add_argument("--state-steps", type=int, default=20, help="Euler steps of the calibration trajectories")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (update = alpha/rank · up·down)")
    p.add_argument("--targets", choices=TARGET_MODULES, default=d.targets, help="layers that get a LoRA")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (AdamW)")
    p.add_argument("--batch", type=int, default=d.batch, help="states per optimiser step")
    p.add_argument("--states", choices=STATE_SOURCES, default=d.states,
                   help="whose trajectories give the training states")
    p.add_argument("--eval-per-class", type=int, default=50, help="evaluation images per digit")
    p.add_argument("--output", type=Path, default=Path("ecodiff_output"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_recover(args: argparse.Namespace) -> int:
    from .recover import RecoverSettings
    from .recover_demo import RecoverDemoSettings, run_recover, summary_text

    try:
        rs = RecoverSettings(rank=args.rank, alpha=args.alpha, targets=args.targets, steps=args.steps, lr=args.lr,
                             batch=args.batch, seed=args.seed, states=args.states)
        settings = RecoverDemoSettings(sparsity=args.sparsity, steps=args.state_steps, seed=args.seed,
                                       eval_per_class=args.eval_per_class, mask=args.mask, output=args.output,
                                       recover=rs)
        result = run_recover(settings, progress=not args.no_progress)
    except EcoDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(result))
    print(f"\nwrote {settings.output / 'recover_report.json'}, recover_lora.safetensors")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecodiff_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _recover_parser(sub)
    args = parser.parse_args(argv)
    import torch

    if args.command == "recover":
        torch.set_num_threads(args.threads)
        return _run_recover(args)

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
