"""The quality table on the embedded default model: EcoDiff vs baselines at equal parameter budgets.

    .venv/bin/python benchmarks/quality.py [--sparsities 0.1 0.2 0.3 0.5] [--seeds 0 1 2] [--json out.json]

For every seed: EcoDiff end to end (time-step checkpointing), EcoDiff with the per-step (local) loss,
EcoDiff learned for each target (``regularizer="target"``: one mask per sparsity, the expected removed
parameters held at it by Lagrange multipliers), magnitude, random and first-order Taylor scores; each
is pruned to every target with the same budget planner and evaluated with the shipped judge (accuracy, FD-judge) on the same evaluation seeds.  Also
prints the pruned sampling speed against the FLOP reduction.  Prints Markdown tables; with --plot,
writes a PNG of FD-judge against sparsity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root is where `ecodiff_core` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecodiff_core.archs import find_layout  # noqa: E402
from ecodiff_core.baselines import magnitude_scores, random_scores, taylor_scores  # noqa: E402
from ecodiff_core.embedded.demo import calibration_samples, default_learn_settings, forward_flops, learn_mask, prune_to  # noqa: E402
from ecodiff_core.embedded.evaluation import EvalSettings, evaluate_model  # noqa: E402
from ecodiff_core.embedded.judge import load_judge, real_data_floor  # noqa: E402
from ecodiff_core.embedded.model import load_default_model, sigmas  # noqa: E402
from ecodiff_core.embedded.text import calibration_prompts  # noqa: E402
from ecodiff_core.learn_settings import LearnSettings  # noqa: E402
from ecodiff_core.plan import PruneTarget, count_parameters  # noqa: E402

METHODS = ("ecodiff", "ecodiff-per-step", "ecodiff-target", "taylor", "magnitude", "random")
TARGET_METHODS = ("ecodiff-target",)  # learned for one sparsity: scored once per sparsity
LEARN_STEPS, CFG = 10, 1.5


def target_learn_settings(sparsity: float, seed: int):
    """The demo's epochs and learning rates, learning for ``sparsity`` of the parameters."""
    official = default_learn_settings()
    return LearnSettings.for_target(sparsity, seed=seed, epochs=official.epochs, accumulate=official.accumulate,
                                    lr=official.lr, gate=official.gate)


def scores_for(method: str, model, layout, seed: int,
               sparsity: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    start = time.perf_counter()
    prompts, _ = calibration_prompts(10)
    samples = calibration_samples(model, prompts, CFG, 10, seed)
    if method in ("ecodiff", "ecodiff-per-step", *TARGET_METHODS):
        objective = "per_step" if method == "ecodiff-per-step" else "end_to_end"
        settings = replace(default_learn_settings(), seed=seed, objective=objective)
        if method in TARGET_METHODS:
            settings = target_learn_settings(sparsity, seed)
        run = learn_mask(model.transformer, layout, settings, samples, sigmas(LEARN_STEPS))
        return run.state.logits, run.seconds
    if method == "taylor":
        scores = taylor_scores(
            model.transformer, layout, [s.denoise for s in samples], [s.noise for s in samples], sigmas(LEARN_STEPS)
        )
    elif method == "magnitude":
        scores = magnitude_scores(model.transformer, layout)
    else:
        scores = random_scores(layout, seed)
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--eval-per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write all measurements here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of FD-judge vs sparsity here")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="only print tables (and plot) from earlier --json files, e.g. one per seed",
    )
    args = parser.parse_args()
    if args.from_json:
        runs = [json.loads(p.read_text()) for p in args.from_json]
        rows = [r for run in runs for r in run["rows"]]
        args.seeds = sorted({r["seed"] for r in rows})
        args.methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        args.sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "original"})
        print_tables(rows, args, runs[0]["fd_floor"])
        if args.plot:
            plot(rows, args, runs[0]["fd_floor"])
        return
    torch.set_num_threads(args.threads)
    model, judge = load_default_model(), load_judge()
    layout = find_layout(model.transformer)
    rows = []
    for seed in args.seeds:
        evaluation = EvalSettings(per_class=args.eval_per_class, steps=20, cfg=CFG, seed=seed)
        base = evaluate_model(model, judge, evaluation)
        rows.append({"method": "original", "seed": seed, "sparsity": 0.0, **_metrics(base)})
        for method in args.methods:
            if method not in TARGET_METHODS:
                scores, seconds = scores_for(method, model, layout, seed)
            for sparsity in args.sparsities:
                if method in TARGET_METHODS:
                    scores, seconds = scores_for(method, model, layout, seed, sparsity)
                pruned, plan = prune_to(model.transformer, layout, scores, PruneTarget(params=sparsity))
                result = evaluate_model(model, judge, evaluation, transformer=pruned)
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "sparsity": sparsity,
                        "score_seconds": seconds,
                        "params_removed": 1 - count_parameters(pruned) / count_parameters(model.transformer),
                        "flops_removed": 1 - forward_flops(model, pruned) / forward_flops(model, model.transformer),
                        **_metrics(result),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    floor = real_data_floor(judge, n=10 * args.eval_per_class)
    print_tables(rows, args, floor)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fd_floor": floor}, indent=1))
    if args.plot:
        plot(rows, args, floor)


def _metrics(r: dict) -> dict:
    return {"accuracy": r["accuracy"], "fd_judge": r["fd_judge"], "sample_seconds": r["sample_seconds"]}


def _cell(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def _select(rows, method, sparsity, key):
    return [r[key] for r in rows if r["method"] == method and r["sparsity"] == sparsity]


def print_tables(rows: list[dict], args, floor: float) -> None:
    n = len(args.seeds)
    print(
        f"Embedded default model, {10 * args.eval_per_class} images per evaluation (CFG {CFG}, 20 Euler steps), "
        f"{n} seeds (mean ± sd). FD-judge real-data floor at this size: {floor:.2f}.\n"
    )
    original_acc, original_fd = _select(rows, "original", 0.0, "accuracy"), _select(rows, "original", 0.0, "fd_judge")
    print(f"Original: accuracy {_cell(original_acc, '.3f')}, FD-judge {_cell(original_fd, '.1f')}\n")
    header = "| method | " + " | ".join(f"−{s:.0%} acc | −{s:.0%} FD" for s in args.sparsities) + " |"
    print(header)
    print("|---|" + "---|---|" * len(args.sparsities))
    for method in args.methods:
        cells = []
        for s in args.sparsities:
            cells += [
                _cell(_select(rows, method, s, "accuracy"), ".3f"),
                _cell(_select(rows, method, s, "fd_judge"), ".1f"),
            ]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nPruned sampling speed (EcoDiff masks; time per evaluation, same settings):\n")
    print("| target | params removed | FLOPs removed | sampling time vs original |")
    print("|---|---|---|---|")
    original_time = statistics.fmean(_select(rows, "original", 0.0, "sample_seconds"))
    for s in args.sparsities:
        method = "ecodiff" if "ecodiff" in args.methods else args.methods[0]
        print(
            f"| −{s:.0%} | {statistics.fmean(_select(rows, method, s, 'params_removed')):.1%} "
            f"| {statistics.fmean(_select(rows, method, s, 'flops_removed')):.1%} "
            f"| {statistics.fmean(_select(rows, method, s, 'sample_seconds')) / original_time:.2f}× |"
        )


def plot(rows: list[dict], args, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in args.methods:
        xs = [0.0] + list(args.sparsities)
        for ax, key in zip(axes, ("accuracy", "fd_judge"), strict=True):
            ys = [statistics.fmean(_select(rows, "original", 0.0, key))]
            ys += [statistics.fmean(_select(rows, method, s, key)) for s in args.sparsities]
            ax.plot([100 * x for x in xs], ys, marker="o", label=method)
    axes[0].set(xlabel="parameters removed (%)", ylabel="judge accuracy", title="accuracy")
    axes[1].set(xlabel="parameters removed (%)", ylabel="FD-judge (lower is better)", title="FD-judge", yscale="log")
    axes[1].axhline(floor, color="gray", linestyle=":", label="real-data floor")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
