"""benchmarks/quality.py's summary: means over seeds per method and sparsity, stored rows combined with
fresh ones (fresh win), rows stored before masks were ranked with their settings kept apart."""
from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, seed, sparsity, accuracy, fd, **extra):
    return {"method": method, "seed": seed, "sparsity": sparsity, "accuracy": accuracy, "fd_judge": fd,
            "sample_seconds": 1.0, "params_removed": sparsity, "flops_removed": sparsity, **extra}


def seed_file(tmp_path, seed, rows):
    path = tmp_path / f"seed{seed}.json"
    path.write_text(json.dumps({"rows": [row("original", seed, 0.0, 1.0, 20.0), *rows], "fd_floor": 7.0}))
    return path


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_summary_from_stored_seed_files(tmp_path, sparsity):
    files = [seed_file(tmp_path, s, [row("taylor", s, sparsity, 0.99 - s / 100, 40.0 + s),
                                     row("ecodiff", s, sparsity, 0.9, 50.0 + 2 * s)])  # stored before settings ranking
             for s in range(3)]
    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--from-json", *map(str, files),
                           "--summary", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    key = f"{sparsity:g}"
    assert list(summary) == ["taylor", "ecodiff-official@logits"]  # legacy name: ranked by raw logits
    assert summary["taylor"][key] == {"accuracy": pytest.approx(statistics.fmean([0.99, 0.98, 0.97])),
                                      "fd_judge": pytest.approx(41.0), "seeds": 3, "cpu_minutes": None}
    assert summary["ecodiff-official@logits"][key]["fd_judge"] == pytest.approx(52.0)
    assert "| taylor |" in done.stdout


def test_fresh_rows_replace_the_stored_rows_they_measure_again(quality, tmp_path):
    files = [seed_file(tmp_path, s, [row("per-step", s, 0.5, 0.9, 30.0 + s, ranking="settings"),
                                     row("taylor", s, 0.5, 0.99, 45.0)]) for s in range(2)]
    stored, floor = quality.load_rows(files)
    fresh = [row("per-step", 1, 0.5, 0.95, 10.0, ranking="settings", cpu_minutes=1.5),
             row("ecodiff", 0, 0.5, 0.99, 20.0, ranking="settings", cpu_minutes=2.0)]
    rows = quality.merge_rows(stored, fresh)
    summary = quality.summary([r for r in rows if r["method"] != "original"])
    assert floor == 7.0
    assert list(summary) == ["ecodiff", "per-step", "taylor"]  # the table's order, then the rest
    assert summary["per-step"]["0.5"] == {"accuracy": pytest.approx(0.925), "fd_judge": pytest.approx(20.0),
                                          "seeds": 2, "cpu_minutes": 1.5}
    assert summary["ecodiff"]["0.5"]["cpu_minutes"] == 2.0 and summary["ecodiff"]["0.5"]["seeds"] == 1
    assert len(rows) == len(stored) + 1  # one stored row replaced, one added


def test_every_recipe_is_valid_and_target_recipes_learn_per_sparsity(quality):
    for name, recipe in quality.RECIPES.items():
        settings = recipe(0.3)
        settings.validate()
        assert quality.learns_per_target(name) == (settings.regularizer == "target")
        if settings.regularizer == "target":
            assert settings.target == 0.3
    assert quality.RECIPES["ecodiff"](0.5) == quality.default_learn_settings()
    assert quality.RECIPES["ecodiff-official"](0.5) == quality.official_learn_settings()


def test_step_table_groups_rows_by_learning_and_evaluation_steps(quality, capsys):
    steps = dict(ranking="settings", cpu_minutes=1.0)
    rows = [row("ecodiff@eval50", s, 0.5, 0.99, 20.0 + s, learn_steps=10, eval_steps=50, **steps) for s in range(3)]
    rows += [row("ecodiff@20steps", 0, 0.5, 0.98, 30.0, learn_steps=20, eval_steps=20, **steps),
             row("x-equal-lr@20steps", 0, 0.5, 0.90, 60.0, learn_steps=20, eval_steps=20, **steps),
             row("original@eval50", 0, 0.0, 1.0, 19.0, eval_steps=50)]
    quality.print_step_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert "| learning steps | evaluation steps | ecodiff | x-equal-lr |" in lines
    assert "| 10 | 50 | 0.990 ± 0.000 / 21.0 ± 1.0 (1.0) | — |" in lines
    assert "| 20 | 20 | 0.980 (1 seed) / 30.0 (1 seed) (1.0) | 0.900 (1 seed) / 60.0 (1 seed) (1.0) |" in lines
    quality.print_step_table(rows[:3])  # one (learning, evaluation) pair: nothing to compare
    assert capsys.readouterr().out == ""
