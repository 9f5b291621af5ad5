"""Command line: ``python -m ecodiff_core demo|recover|memory|learn|prune|report [options]``.

``learn``, ``prune`` and ``report`` work on local diffusers pipelines (``cli_diffusers``); ``learn``
runs data-parallel under ``torchrun --nproc-per-node N -m ecodiff_core learn ...``.

Every bad argument ends in one ``error:`` line and exit code 2 (argparse's convention): the engine
validates the settings before any work starts and its EcoDiffError goes to ``parser.error``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from .errors import EcoDiffError, SettingsError
from .seeds import SEED_MAX
from .validation import field_defaults

C_INT_MAX = 2**31 - 1  # counts go to torch and C code as C ints
MAX_RESOLUTION = 16384  # ComfyUI's largest image side
MAX_THREADS = 1024


def _int_in(low: int | None, high: int) -> Callable[[str], int]:
    """argparse type: an integer in ``low..high``, so no value overflows where it is used.  ``low``
    None: no lower bound here, for settings whose lower bound the engine checks with its own message
    before anything uses the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value > high or (low is not None and value < low):
            where = f"in {low}..{high}" if low is not None else f"<= {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {where}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_at_least_one = _int_in(1, MAX_THREADS)  # --threads


@contextlib.contextmanager
def command_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """The engine's errors become ``prog: error: …`` and exit code 2; Ctrl-C exits 130 without a traceback."""
    try:
        yield
    except EcoDiffError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print(f"{parser.prog}: error: interrupted", file=sys.stderr)
        sys.exit(130)


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations ``argv`` sets explicitly (argparse fills the others from their defaults, so a
    parsed namespace cannot tell): ``argv`` is parsed again with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (a handler bound to the stream of the
    moment would keep writing to a replaced, maybe closed, one: pytest's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr() -> None:
    """The ``ecodiff`` logger's INFO lines on stderr, once per process; other libraries' loggers and the
    root logger are left as the caller configured them."""
    log = logging.getLogger("ecodiff")
    log.setLevel(logging.INFO)
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        log.addHandler(_CurrentStderr())


def refuse_ignored(args: argparse.Namespace, names: Iterable[str], why: str) -> None:
    """Options among ``names`` that the command line gave (``args.given``, see :func:`given_options`)
    but this run would ignore: one SettingsError naming them and saying why, even at their default value."""
    given = sorted(set(names) & set(getattr(args, "given", ())))
    if given:
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        raise SettingsError(f"{args.command}: {flags}: {why}")


def _demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .embedded.demo import DemoSettings

    d = field_defaults(DemoSettings)  # the one place for the defaults
    p = sub.add_parser("demo", help="learn a mask on the embedded default model, prune it, measure the cost",
                       description="Learn an EcoDiff mask on the shipped digits model (FLUX architecture; "
                                   "the default recipe: per-step objective, one learning rate for every unit "
                                   "kind, see docs/benchmarks.md), prune it physically, and compare original and "
                                   "pruned with the shipped judge. Writes compare.png, report.txt, report.json and "
                                   "mask.safetensors to the output folder.")
    p.add_argument("--sparsity", type=float, default=d["sparsity"], help="fraction of parameters to remove (0-0.95)")
    p.add_argument("--steps", type=_int_in(None, C_INT_MAX), default=d["steps"],
                   help="Euler steps of each learning trajectory")
    p.add_argument("--epochs", type=_int_in(None, C_INT_MAX), default=d["learn"].epochs,
                   help="passes over the calibration prompts")
    p.add_argument("--beta", type=float, default=d["learn"].beta, help="weight of the sparsity regulariser")
    p.add_argument("--prompts-per-class", type=_int_in(None, C_INT_MAX), default=d["prompts_per_class"],
                   help="calibration prompts per digit")
    p.add_argument("--eval-per-class", type=_int_in(None, C_INT_MAX), default=d["eval_per_class"],
                   help="evaluation images per digit")
    p.add_argument("--eval-steps", type=_int_in(None, C_INT_MAX), default=d["eval_steps"],
                   help="Euler steps when evaluating")
    p.add_argument("--output", type=Path, default=d["output"], help="output folder")
    p.add_argument("--seed", type=_int_in(0, SEED_MAX), default=d["seed"], help=f"random seed, 0..{SEED_MAX}")
    p.add_argument("--threads", type=_at_least_one, default=1,
                   help="CPU threads for torch (the default model is small; 1 avoids oversubscription)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _memory_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .fullsize import ARCHS, WEIGHT_DTYPES

    p = sub.add_parser("memory", help="estimate the GPU memory of one learning step of a full-size model",
                       description="Trace one learning step (gated forward with grad + vector-Jacobian "
                                   "product) of a full-size model on the meta device (no download, no GPU) "
                                   "and print weights, activations and total in GB, with and without "
                                   "block checkpointing.")
    p.add_argument("--arch", required=True, choices=list(ARCHS), help="the published model")
    p.add_argument("--width", type=_int_in(None, MAX_RESOLUTION), default=1024, help="image width in pixels")
    p.add_argument("--height", type=_int_in(None, MAX_RESOLUTION), default=1024, help="image height in pixels")
    p.add_argument("--batch", type=_int_in(None, 4096), default=1, help="images per step")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance (doubles the batch)")
    p.add_argument("--weight-dtype", default="bf16", choices=list(WEIGHT_DTYPES), help="stored weight dtype")
    p.add_argument("--block-checkpointing", choices=("on", "off"), default=None,
                   help="show only this mode (default: both)")
    return p


def memory_command(args: argparse.Namespace) -> int:
    """``python -m ecodiff_core memory``: print the preflight's estimate for a full-size model."""
    from .fullsize import memory_table, step_memory

    mode = None if args.block_checkpointing is None else args.block_checkpointing == "on"
    # "off" also traces "on", to show what block checkpointing would save
    modes = (True,) if mode is True else (False, True)
    report = step_memory(args.arch, args.width, args.height, args.batch, args.cfg, args.weight_dtype, modes)
    print(memory_table(report, mode))
    return 0


def _recover_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .embedded.recover_demo import RecoverDemoSettings
    from .recover import STATE_SOURCES, TARGET_MODULES

    run = field_defaults(RecoverDemoSettings)  # the one place for the defaults
    d = run["recover"]
    p = sub.add_parser("recover", help="prune the embedded model, then recover quality with a distilled LoRA",
                       description="Learn (or load) an EcoDiff mask on the shipped digits model, prune it, train a "
                                   "LoRA on the pruned model that matches the original's x0 predictions along "
                                   "calibration trajectories (LoRA Recover), and judge original, pruned and "
                                   "recovered models. Writes recover_report.json and recover_lora.safetensors "
                                   "(with --model: only recover_lora.safetensors).")
    p.add_argument("--sparsity", type=float, default=run["sparsity"], help="fraction of parameters to remove (0-0.95)")
    p.add_argument("--mask", type=Path, default=run["mask"], help="mask file to prune with (default: learn one)")
    p.add_argument("--state-steps", type=_int_in(None, C_INT_MAX), default=run["steps"],
                   help="Euler steps of the calibration trajectories")
    p.add_argument("--rank", type=_int_in(None, C_INT_MAX), default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (update = alpha/rank · up·down)")
    p.add_argument("--targets", choices=TARGET_MODULES, default=d.targets, help="layers that get a LoRA")
    p.add_argument("--steps", type=_int_in(None, C_INT_MAX), default=d.steps, help="optimiser steps")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (AdamW)")
    p.add_argument("--batch", type=_int_in(None, C_INT_MAX), default=d.batch, help="states per optimiser step")
    p.add_argument("--states", choices=STATE_SOURCES, default=d.states,
                   help="whose trajectories give the training states")
    p.add_argument("--eval-per-class", type=_int_in(None, C_INT_MAX), default=run["eval_per_class"],
                   help="evaluation images per digit")
    p.add_argument("--output", type=Path, default=run["output"], help="output folder")
    p.add_argument("--seed", type=_int_in(0, SEED_MAX), default=run["seed"], help=f"random seed, 0..{SEED_MAX}")
    p.add_argument("--threads", type=_at_least_one, default=1, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .cli_diffusers import add_recover_arguments

    diffusers_only = add_recover_arguments(p)  # --model DIR: the same recovery on a pruned diffusers denoiser
    p.set_defaults(embedded_only=("sparsity", "mask", "eval_per_class"), diffusers_only=diffusers_only)
    return p


def _check_recover_mode(args: argparse.Namespace) -> None:
    """``recover`` prunes and judges the embedded model, or (``--model DIR``) recovers a pruned diffusers
    file: an option of the other mode would be ignored, so it is an error that says which mode takes it."""
    if args.model is not None:
        refuse_ignored(args, args.embedded_only, "only for the embedded model; with --model, prune first "
                       "(python -m ecodiff_core prune --model DIR --mask M --sparsity S) and pass the result as "
                       "--pruned")
    else:
        refuse_ignored(args, args.diffusers_only, "only with --model DIR (a local diffusers pipeline)")


def _run_recover(args: argparse.Namespace) -> int:
    from .embedded.recover_demo import RecoverDemoSettings, run_recover, summary_text
    from .recover import RecoverSettings

    rs = RecoverSettings(rank=args.rank, alpha=args.alpha, targets=args.targets, steps=args.steps, lr=args.lr,
                         batch=args.batch, seed=args.seed, states=args.states)
    settings = RecoverDemoSettings(sparsity=args.sparsity, steps=args.state_steps, seed=args.seed,
                                   eval_per_class=args.eval_per_class, mask=args.mask, output=args.output,
                                   recover=rs)
    result = run_recover(settings, progress=not args.no_progress)
    print(summary_text(result))
    print(f"\nwrote {settings.output / 'recover_report.json'}, recover_lora.safetensors")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecodiff_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = _demo_parser(sub)
    memory = _memory_parser(sub)
    recover = _recover_parser(sub)
    from .cli_diffusers import COMMANDS

    diffusers_commands = {name: (add(sub), run) for name, (add, run) in COMMANDS.items()}
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    parsers = {"demo": demo, "memory": memory, "recover": recover,
               **{name: p for name, (p, _) in diffusers_commands.items()}}
    args.given = given_options(parsers[args.command], argv[argv.index(args.command) + 1:])
    if args.command in diffusers_commands:
        command_parser, run = diffusers_commands[args.command]
        _log_to_stderr()
        with command_errors(command_parser):
            return run(args)
    if args.command == "memory":
        with command_errors(memory):
            return memory_command(args)
    import torch

    if args.command == "recover":
        torch.set_num_threads(args.threads)
        with command_errors(recover):
            _check_recover_mode(args)
            if args.model is not None:
                from .cli_diffusers import recover_command

                return recover_command(args)
            return _run_recover(args)

    from .embedded.demo import DemoSettings, run_demo, summary_text

    torch.set_num_threads(args.threads)

    with command_errors(demo):
        learn = replace(field_defaults(DemoSettings)["learn"], epochs=args.epochs, beta=args.beta)
        settings = DemoSettings(sparsity=args.sparsity, steps=args.steps, prompts_per_class=args.prompts_per_class,
                                eval_per_class=args.eval_per_class, eval_steps=args.eval_steps, seed=args.seed,
                                output=args.output, learn=learn)
        result = run_demo(settings, progress=not args.no_progress)
    print(summary_text(result))
    print(f"\nwrote {settings.output / 'compare.png'}, report.txt, report.json, mask.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
