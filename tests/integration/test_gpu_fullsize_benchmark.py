"""benchmarks/gpu_fullsize.py cannot rot: its --device cpu --tiny mode runs the very code of the GPU
run (ComfyUI's SDXL and FLUX classes, bf16 and fp8 weights, learning with and without block
checkpointing, aligned and unaligned pruning) and prints a complete table of sane values."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.comfy_env import comfy_path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_prints_a_complete_table() -> None:
    env = dict(os.environ, COMFYUI_PATH=comfy_path())
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fullsize.py"), "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| ")]
    header, body = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
    assert [(r[0], r[1]) for r in body] == [("SDXL", "bf16"), ("SDXL", "fp8"), ("FLUX.1-dev", "bf16"),
                                            ("FLUX.1-dev", "fp8")]
    for r in body:
        values = dict(zip(header[2:], map(float, r[2:]), strict=True))
        assert all(v > 0 for v in values.values()), r
        assert values["learn / infer"] > 1  # a learning trajectory costs more than sampling one
        assert values["learn peak GB, plain"] > values["weights GB"]
        assert values["learn / infer"] == pytest.approx(values["learn s, plain"] / values["infer s"], rel=0.02)
    fp8 = {r[0]: float(r[2]) for r in body if r[1] == "fp8"}
    bf16 = {r[0]: float(r[2]) for r in body if r[1] == "bf16"}
    assert all(fp8[m] < bf16[m] for m in fp8)  # fp8 weights are stored in fp8
    removed = [float(x) / 100 for x in re.findall(r"pruned −([\d.]+)% \(align", done.stderr)]
    assert len(removed) == 8 and all(0.2 <= x < 0.21 for x in removed), removed
