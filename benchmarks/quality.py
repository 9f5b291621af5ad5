"""The quality table on the embedded default model: EcoDiff vs baselines at equal parameter budgets.

    .venv/bin/python benchmarks/quality.py [--sparsities 0.3 0.5] [--seeds 0 1 2] [--methods ...] \
        [--json out.json] [--from-json docs/quality_runs/seed*.json] [--summary docs/quality_runs/summary.json]

Methods: "ecodiff" (the demo's default learning settings, ``default_learn_settings``),
"ecodiff-official" (the official FLUX configuration, end to end), "per-step" (the same with the per-step
loss), the data-free "taylor", "magnitude" and "random" scores, and the recipes of the search in
``RECIPES`` ("x-…").  A learned mask is pruned with its own settings (``plan.ranking_scores``, as Apply
Pruned Mask does); a recipe learned for a target (``regularizer="target"``) is learned once per
sparsity.  Every target gets the same budget planner and the shipped judge (accuracy, FD-judge) on the
same evaluation seeds.  Each row records the CPU-minutes of its scoring (process CPU time, 1 thread).

With ``--from-json`` the stored rows are read first; fresh rows (if any ``--methods`` are run) replace
stored rows of the same method, seed and sparsity.  ``--summary`` writes
``{method: {sparsity: {"accuracy", "fd_judge", "seeds", "cpu_minutes"}}}`` (means over seeds).
Prints Markdown tables; with --plot, writes a PNG of FD-judge against sparsity.  ``--learn-steps N``
learns on N-step trajectories; ``--eval-steps A B ...`` evaluates each mask at every count given; rows at
more than one (learning, evaluation) pair also get a learning × evaluation steps table
(``docs/quality_runs/steps/``: ``--from-json docs/quality_runs/steps/*.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root is where `ecodiff_core` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecodiff_core.archs import find_layout  # noqa: E402
from ecodiff_core.baselines import magnitude_scores, random_scores, taylor_scores  # noqa: E402
from ecodiff_core.embedded.demo import (  # noqa: E402
    calibration_samples,
    default_learn_settings,
    forward_flops,
    learn_mask,
    official_learn_settings,
    prune_to,
)
from ecodiff_core.embedded.evaluation import EvalSettings, evaluate_model  # noqa: E402
from ecodiff_core.embedded.judge import load_judge, real_data_floor  # noqa: E402
from ecodiff_core.embedded.model import load_default_model, sigmas  # noqa: E402
from ecodiff_core.embedded.text import calibration_prompts  # noqa: E402
from ecodiff_core.learn_settings import TARGET, LearnSettings  # noqa: E402
from ecodiff_core.plan import PruneTarget, count_parameters  # noqa: E402

LEARN_STEPS, CFG = 10, 1.5
EQUAL_LR = {"head": 0.1, "neuron": 0.1, "channel": 0.1}


def _target(base: LearnSettings, sparsity: float, **fields) -> LearnSettings:
    fields = {**vars(base), **fields}
    for name in ("regularizer", "target"):
        fields.pop(name)
    return LearnSettings.for_target(sparsity, **fields)


# name -> settings for (sparsity); the official configuration's variants tried in the search
RECIPES: dict[str, Callable[[float], LearnSettings]] = {
    "ecodiff": lambda s: default_learn_settings(),
    "ecodiff-official": lambda s: official_learn_settings(),
    "per-step": lambda s: replace(official_learn_settings(), objective="per_step"),
    "x-target": lambda s: _target(official_learn_settings(), s),
    "x-target-equal-lr": lambda s: _target(official_learn_settings(), s, lr=EQUAL_LR),
    "x-target-per-step": lambda s: _target(official_learn_settings(), s, lr=EQUAL_LR, objective="per_step"),
    "x-equal-lr": lambda s: replace(official_learn_settings(), lr=EQUAL_LR),
    "x-per-step-16": lambda s: replace(official_learn_settings(), objective="per_step", epochs=16),
    "x-warm4": lambda s: replace(official_learn_settings(), warm_start=0.5),
    "x-warm4-equal-lr": lambda s: replace(official_learn_settings(), warm_start=0.5, lr=EQUAL_LR),
    "x-warm4-target": lambda s: _target(official_learn_settings(), s, lr=EQUAL_LR, warm_start=0.5),
}
BASELINES = ("taylor", "magnitude", "random")
METHODS = (*RECIPES, *BASELINES)
ORDER = ("ecodiff", "ecodiff-official", "per-step", *BASELINES)  # the summary's and tables' first rows


def learns_per_target(method: str) -> bool:
    return method in RECIPES and RECIPES[method](0.5).regularizer == TARGET


def scores_for(method: str, model, layout, seed: int, sparsity: float = 0.5,
               learn_steps: int = LEARN_STEPS) -> tuple[dict[str, torch.Tensor], LearnSettings | None, float]:
    """(scores, the mask's settings for Apply's ranking or None for a baseline, CPU-minutes)."""
    cpu = time.process_time()
    prompts, _ = calibration_prompts(10)
    samples = calibration_samples(model, prompts, CFG, 10, seed)
    settings = None
    if method in RECIPES:
        settings = replace(RECIPES[method](sparsity), seed=seed)
        run = learn_mask(model.transformer, layout, settings, samples, sigmas(learn_steps))
        scores, settings = run.state.logits, run.state.settings
        last = run.state.history[-1] if run.state.history else {}
        print(json.dumps({"method": method, "seed": seed, "last_step": last, "closed": _closed(scores, settings)}),
              file=sys.stderr)
    elif method == "taylor":
        scores = taylor_scores(
            model.transformer, layout, [s.denoise for s in samples], [s.noise for s in samples], sigmas(learn_steps)
        )
    elif method == "magnitude":
        scores = magnitude_scores(model.transformer, layout)
    else:
        scores = random_scores(layout, seed)
    return scores, settings, (time.process_time() - cpu) / 60


def _closed(logits: dict[str, torch.Tensor], settings: LearnSettings) -> dict[str, float]:
    """Fraction of units per group whose expected gate is 0 (a diagnostic of what learning closed)."""
    from ecodiff_core.hard_concrete import expected_gate

    return {name: round(float((expected_gate(lam, settings.gate) == 0).float().mean()), 3)
            for name, lam in logits.items() if lam.numel() > 1}


# rows stored before masks were ranked with their settings (raw logits then): kept apart, renamed
LEGACY_NAMES = {"ecodiff": "ecodiff-official@logits", "ecodiff-per-step": "per-step@logits",
                "ecodiff-target": "x-target@logits"}


def load_rows(paths: list[Path]) -> tuple[list[dict], float | None]:
    """Rows of earlier --json files (legacy learned rows renamed, see ``LEGACY_NAMES``) and their floor."""
    rows, floor = [], None
    for path in paths:
        run = json.loads(path.read_text())
        floor = run.get("fd_floor", floor)
        for r in run["rows"]:
            if r["method"] in LEGACY_NAMES and "ranking" not in r:
                r = {**r, "method": LEGACY_NAMES[r["method"]]}
            rows.append(r)
    return rows, floor


def merge_rows(stored: list[dict], fresh: list[dict]) -> list[dict]:
    """``stored`` without the (method, seed, sparsity) that ``fresh`` measured again, then ``fresh``."""
    key = lambda r: (r["method"], r["seed"], r["sparsity"])  # noqa: E731
    again = {key(r) for r in fresh}
    return [r for r in stored if key(r) not in again] + fresh


def summary(rows: list[dict]) -> dict:
    """{method: {sparsity: {"accuracy", "fd_judge" (means over seeds), "seeds", "cpu_minutes"}}}; the
    sparsity keys as text ("0.3"); ``cpu_minutes`` is the mean scoring CPU time (None where not recorded)."""
    out: dict[str, dict[str, dict]] = {}
    methods = [*[m for m in ORDER if any(r["method"] == m for r in rows)],
               *sorted({r["method"] for r in rows} - set(ORDER))]
    for method in methods:
        for sparsity in sorted({r["sparsity"] for r in rows if r["method"] == method}):
            sel = [r for r in rows if r["method"] == method and r["sparsity"] == sparsity]
            cpu = [r["cpu_minutes"] for r in sel if r.get("cpu_minutes") is not None]
            out.setdefault(method, {})[f"{sparsity:g}"] = {
                "accuracy": statistics.fmean(r["accuracy"] for r in sel),
                "fd_judge": statistics.fmean(r["fd_judge"] for r in sel),
                "seeds": len({r["seed"] for r in sel}),
                "cpu_minutes": statistics.fmean(cpu) if cpu else None,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", choices=METHODS,
                        help="methods to run (default: all, or none with --from-json)")
    parser.add_argument("--eval-per-class", type=int, default=50)
    parser.add_argument("--learn-steps", type=int, default=LEARN_STEPS,
                        help="Euler steps of the calibration trajectories (other than 10: rows named METHOD@Nsteps)")
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[20],
                        help="Euler steps of the evaluation, one or more (each mask is learned once and "
                        "evaluated at each; other than 20: rows named METHOD@evalN)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-original", action="store_true", help="do not evaluate the unpruned model")
    parser.add_argument("--json", type=Path, help="write the fresh measurements here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of FD-judge vs sparsity here")
    parser.add_argument("--from-json", type=Path, nargs="+", default=[],
                        help="earlier --json files (e.g. one per seed) to combine with the fresh rows")
    parser.add_argument("--summary", type=Path, help="write the summary JSON (means over seeds) here")
    args = parser.parse_args()
    if args.methods is None:
        args.methods = [] if args.from_json else list(METHODS)
    stored, floor = load_rows(args.from_json)
    fresh = measure(args) if args.methods else []
    if fresh:
        floor = real_data_floor(load_judge(), n=10 * args.eval_per_class)
        if args.json:
            args.json.write_text(json.dumps({"rows": fresh, "fd_floor": floor}, indent=1))
    rows = merge_rows(stored, fresh)
    args.seeds = sorted({r["seed"] for r in rows})
    args.methods = [m for m in summary(rows) if m != "original"]
    args.sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "original"})
    print_tables(rows, args, floor)
    print_step_table(rows)
    if args.summary:
        args.summary.write_text(json.dumps(summary([r for r in rows if r["method"] != "original"]), indent=1) + "\n")
    if args.plot:
        plot(rows, args, floor)


def measure(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, judge = load_default_model(), load_judge()
    layout = find_layout(model.transformer)
    rows = []
    for seed in args.seeds:
        evaluations = [EvalSettings(per_class=args.eval_per_class, steps=n, cfg=CFG, seed=seed)
                       for n in args.eval_steps]
        if not args.skip_original:
            for evaluation in evaluations:
                base = evaluate_model(model, judge, evaluation)
                rows.append({"method": "original" + _eval_suffix(evaluation.steps), "seed": seed, "sparsity": 0.0,
                             "eval_steps": evaluation.steps, **_metrics(base)})
        for method in args.methods:
            if not learns_per_target(method):
                scores, settings, cpu_minutes = scores_for(method, model, layout, seed, learn_steps=args.learn_steps)
            for sparsity in args.sparsities:
                if learns_per_target(method):
                    scores, settings, cpu_minutes = scores_for(method, model, layout, seed, sparsity, args.learn_steps)
                pruned, _ = prune_to(model.transformer, layout, scores, PruneTarget(params=sparsity), settings=settings)
                for evaluation in evaluations:
                    result = evaluate_model(model, judge, evaluation, transformer=pruned)
                    rows.append(
                        {
                            "method": method + (f"@{args.learn_steps}steps" if args.learn_steps != LEARN_STEPS else "")
                            + _eval_suffix(evaluation.steps),
                            "seed": seed,
                            "sparsity": sparsity,
                            "cpu_minutes": cpu_minutes,
                            "learn_steps": args.learn_steps,
                            "eval_steps": evaluation.steps,
                            "ranking": "settings" if settings is not None else "scores",
                            "params_removed": 1 - count_parameters(pruned) / count_parameters(model.transformer),
                            "flops_removed": 1 - forward_flops(model, pruned) / forward_flops(model, model.transformer),
                            **_metrics(result),
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _eval_suffix(steps: int) -> str:
    return f"@eval{steps}" if steps != 20 else ""


def _metrics(r: dict) -> dict:
    return {"accuracy": r["accuracy"], "fd_judge": r["fd_judge"], "sample_seconds": r["sample_seconds"]}


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{fmt}} (1 seed)"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def _select(rows, method, sparsity, key):
    return [r[key] for r in rows if r["method"] == method and r["sparsity"] == sparsity]


def print_tables(rows: list[dict], args, floor: float) -> None:
    n = len(args.seeds)
    print(
        f"Embedded default model, {10 * args.eval_per_class} images per evaluation (CFG {CFG}, 20 Euler steps), "
        f"{n} seeds (mean ± sd). FD-judge real-data floor at this size: {floor or float('nan'):.2f}.\n"
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
    original_time = statistics.fmean(_select(rows, "original", 0.0, "sample_seconds") or [float("nan")])
    method = "ecodiff" if "ecodiff" in args.methods else args.methods[0]
    for s in args.sparsities:
        if not _select(rows, method, s, "params_removed"):
            continue
        print(
            f"| −{s:.0%} | {statistics.fmean(_select(rows, method, s, 'params_removed')):.1%} "
            f"| {statistics.fmean(_select(rows, method, s, 'flops_removed')):.1%} "
            f"| {statistics.fmean(_select(rows, method, s, 'sample_seconds')) / original_time:.2f}× |"
        )


def print_step_table(rows: list[dict]) -> None:
    """Learning steps × evaluation steps, one column per method (its name before any "@"): accuracy /
    FD-judge (mean ± sd over seeds) and CPU-minutes of learning, per sparsity.  Printed when the rows
    hold more than one (learning, evaluation) pair of step counts."""
    learned = [r for r in rows if r["method"] != "original" and "learn_steps" in r]
    pairs = sorted({(r["learn_steps"], r.get("eval_steps", 20)) for r in learned})
    if len(pairs) < 2:
        return
    methods = list(dict.fromkeys(r["method"].split("@")[0] for r in learned))
    for sparsity in sorted({r["sparsity"] for r in learned}):
        print(f"\nLearning vs evaluation steps at −{sparsity:.0%}: accuracy / FD-judge (CPU-min of learning)\n")
        print("| learning steps | evaluation steps | " + " | ".join(methods) + " |")
        print("|---|---|" + "---|" * len(methods))
        for learn, evaluate in pairs:
            cells = []
            for method in methods:
                chosen = [r for r in learned if r["method"].split("@")[0] == method and r["sparsity"] == sparsity
                          and (r["learn_steps"], r.get("eval_steps", 20)) == (learn, evaluate)]
                if not chosen:
                    cells.append("—")
                    continue
                acc = _cell([r["accuracy"] for r in chosen], ".3f")
                fd = _cell([r["fd_judge"] for r in chosen], ".1f")
                cpu = statistics.fmean(r["cpu_minutes"] for r in chosen)
                cells.append(f"{acc} / {fd} ({cpu:.1f})")
            print(f"| {learn} | {evaluate} | " + " | ".join(cells) + " |")


def plot(rows: list[dict], args, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in args.methods:
        xs = [0.0] + list(args.sparsities)
        for ax, key in zip(axes, ("accuracy", "fd_judge"), strict=True):
            ys = [statistics.fmean(_select(rows, "original", 0.0, key))]
            ys += [statistics.fmean(_select(rows, method, s, key) or [float("nan")]) for s in args.sparsities]
            ax.plot([100 * x for x in xs], ys, marker="o", label=method)
    axes[0].set(xlabel="parameters removed (%)", ylabel="judge accuracy", title="accuracy")
    axes[1].set(xlabel="parameters removed (%)", ylabel="FD-judge (lower is better)", title="FD-judge", yscale="log")
    axes[1].axhline(floor, color="gray", linestyle=":", label="real-data floor")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
