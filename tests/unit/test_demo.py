"""The README's main job, shortened: it runs, writes its outputs, and reports what it measured."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ecodiff_core.archs import find_layout
from ecodiff_core.embedded.demo import DemoSettings, default_learn_settings, prune_to, run_demo
from ecodiff_core.embedded.evaluation import EvalSettings, evaluate_model
from ecodiff_core.embedded.judge import load_judge
from ecodiff_core.embedded.model import load_default_model
from ecodiff_core.errors import SettingsError
from ecodiff_core.maskfile import load_mask
from ecodiff_core.plan import PruneTarget, count_parameters

ROOT = Path(__file__).resolve().parents[2]


def quick(tmp_path: Path) -> DemoSettings:
    return DemoSettings(sparsity=0.2, steps=3, prompts_per_class=2, prompts_per_trajectory=10, eval_per_class=4,
                        eval_steps=4, output=tmp_path, learn=replace(default_learn_settings(), epochs=1))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    settings = quick(out)
    return settings, run_demo(settings, progress=False)


def test_demo_writes_its_outputs(demo_run):
    settings, result = demo_run
    for name in ("compare.png", "report.txt", "report.json", "mask.safetensors"):
        assert (settings.output / name).is_file(), name
    assert json.loads((settings.output / "report.json").read_text()) == json.loads(json.dumps(result, default=str))
    text = (settings.output / "report.txt").read_text()
    assert "judge accuracy" in text and "FD-judge" in text


def test_report_numbers_are_the_measured_ones(demo_run):
    """Rebuild the pruned model from the saved mask and re-measure: the report must agree."""
    settings, result = demo_run
    model, judge = load_default_model(), load_judge()
    layout = find_layout(model.transformer)
    state = load_mask(settings.output / "mask.safetensors", layout)
    pruned, plan = prune_to(model.transformer, layout, state.logits, PruneTarget(params=settings.sparsity),
                            settings=state.settings)
    assert result["params_before"] == count_parameters(model.transformer)
    assert result["params_after"] == count_parameters(pruned)
    assert abs(plan.removed_params - settings.sparsity * result["params_before"]) <= max(
        plan.removed_params, 1) * 0.05
    evaluation = EvalSettings(**result["evaluation"])
    after = evaluate_model(model, judge, evaluation, transformer=pruned)
    before = evaluate_model(model, judge, evaluation)
    assert result["judge_after"]["accuracy"] == pytest.approx(after["accuracy"])
    assert result["judge_after"]["fd_judge"] == pytest.approx(after["fd_judge"], rel=1e-4)
    assert result["judge_before"]["fd_judge"] == pytest.approx(before["fd_judge"], rel=1e-4)
    assert result["flops_per_call_after"] < result["flops_per_call_before"]
    assert len(state.history) == result["learning"]["trajectories_per_epoch"]


def test_cli_rejects_bad_sparsity(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ecodiff_core", "demo", "--sparsity", "1.5", "--output",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "0.95" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith(
        "python -m ecodiff_core demo: error: ")


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--eval-steps", "-1"], "eval_steps must be >= 1, got -1"),
    (["--prompts-per-class", "0"], "prompts_per_class must be >= 1"),
    (["--eval-per-class", "0"], "eval_per_class must be >= 1"),
    (["--eval-per-class", "100000"], "eval_per_class must be <= 145"),
    (["--sparsity", "20"], r"\[0, 0.95\], got 20"),
    (["--sparsity", "nan"], "must be a number, got nan"),
    (["--beta", "-1"], "beta .* >= 0, got -1"),
    (["--beta", "inf"], "finite number"),
    (["--threads", "0"], "argument --threads: must be an integer in 1..1024, got 0"),
    # integers beyond what torch and C code take: refused while parsing, never an overflow later
    (["--seed", "99999999999999999999999"], "argument --seed: must be an integer in 0..18446744073709551615"),
    (["--seed", "18446744073709551616"], "argument --seed: must be an integer in 0..18446744073709551615"),
    (["--seed", "-1"], "argument --seed: must be an integer in 0..18446744073709551615, got -1"),
    (["--threads", "99999999999999999999"], "argument --threads: must be an integer in 1..1024"),
    (["--steps", "99999999999999999999"], "argument --steps: must be an integer <= 2147483647"),
    (["--epochs", "99999999999999999999"], "argument --epochs: must be an integer <= 2147483647"),
    (["--eval-steps", "2147483648"], "argument --eval-steps: must be an integer <= 2147483647"),
    (["--prompts-per-class", "99999999999999999999"], "argument --prompts-per-class: must be an integer <="),
    (["--eval-per-class", "99999999999999999999"], "argument --eval-per-class: must be an integer <="),
    (["--steps", "-99999999999999999999"], "steps must be >= 1, got -99999999999999999999"),
    (["--seed", "1" * 5000], "argument --seed: invalid int value"),
    (["--steps", "two"], "argument --steps: invalid int value"),
    (["--output", "{file}"], "is a file, not a folder"),
    (["--output", "{file}/inside"], "cannot create the output folder"),
    (["--unknown"], "unrecognized arguments"),
])
def test_cli_bad_argument_is_one_error_line(args, message, tmp_path, capsys, monkeypatch):
    """Each bad argument: exit code 2, usage and one `error:` line naming the problem; nothing runs."""
    import re

    import torch

    from ecodiff_core import __main__ as cli

    existing = tmp_path / "a_file"
    existing.write_text("x")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr("ecodiff_core.embedded.demo.run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    argv = ["demo", "--no-progress", *(a.format(file=existing) for a in args)]
    if "--output" not in args:
        argv += ["--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1, err
    assert re.match(r"python -m ecodiff_core( demo)?: error: ", errors[0]) and re.search(message, errors[0]), err


def test_bad_demo_settings(tmp_path):
    with pytest.raises(SettingsError, match="steps"):
        run_demo(replace(quick(tmp_path), steps=0), progress=False)
    with pytest.raises(ValueError, match="steps"):  # SettingsError stays a ValueError for older callers
        run_demo(replace(quick(tmp_path), steps=0), progress=False)
