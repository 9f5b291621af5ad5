"""Data-parallel learning: two gloo processes under torchrun take the steps one process takes, and an
interrupted two-process run resumes to the same result."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ecodiff_core.__main__ import main
from ecodiff_core.distributed import DataParallel
from ecodiff_core.maskfile import load_mask
from tiny_pipelines import IMAGE, save

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cat", "a blue dog", "a green tree", "the sun", "a big house", "a small boat"]


def test_prompts_are_sharded_by_index_and_one_process_reduces_to_itself():
    assert [DataParallel(r, 3).shard(7) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert all(sum(DataParallel(r, 3).owns(i) for r in range(3)) == 1 for i in range(7))
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    assert DataParallel(0, 1).all_reduce(grads, torch.tensor(0.25, dtype=torch.float64)).item() == 0.25
    assert grads[0].tolist() == [1.0, -2.0] and grads[1].tolist() == [[3.0]]


def _learn_args(model: Path, prompts: Path, output: Path, *extra: str) -> list[str]:
    # 6 prompts, 4 per step: the second chunk of each epoch may hold prompts of one process only
    return ["learn", "--model", str(model), "--prompts", str(prompts), "--steps", "2", "--epochs", "2",
            "--accumulate", "4", "--beta", "0.1", "--lr-head", "0.3", "--lr-neuron", "0.3", "--seed", "3",
            "--width", str(IMAGE), "--height", str(IMAGE), "--output", str(output), "--no-progress",
            "--threads", "1", *extra]


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ecodiff_core", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_run(a: Path, b: Path) -> None:
    one, two = load_mask(a), load_mask(b)
    assert one.progress == two.progress
    assert one.inputs == two.inputs
    for name in one.logits:
        torch.testing.assert_close(two.logits[name], one.logits[name], rtol=1e-5, atol=1e-6)
    assert set(one.optimizer) == set(two.optimizer)
    for key in one.optimizer:  # AdamW moments: the gradients' scale (mean over the step's prompts) too
        torch.testing.assert_close(two.optimizer[key], one.optimizer[key], rtol=1e-4, atol=1e-9)
    for h1, h2 in zip(one.history, two.history, strict=True):
        assert h2["recon"] == pytest.approx(h1["recon"], rel=1e-5, abs=1e-12)
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-6)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_two_processes_equal_one_and_an_interrupted_run_resumes(tmp_path):
    model = save("sd15", tmp_path / "sd15")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    single_part, single = tmp_path / "single_part.safetensors", tmp_path / "single.safetensors"
    assert main(_learn_args(model, prompts, single_part, "--stop-after", "1")) == 0
    assert main(_learn_args(model, prompts, single)) == 0
    fresh = load_mask(single)
    assert fresh.progress["finished"] and fresh.progress["step"] == 4
    assert any(float((v - 3.0).abs().max()) > 0.1 for v in fresh.logits.values())  # the logits did move

    two = tmp_path / "two.safetensors"
    _torchrun(_learn_args(model, prompts, two, "--stop-after", "1"))  # interrupted after one step
    _assert_same_run(single_part, two)
    _torchrun(_learn_args(model, prompts, two, "--resume"))
    _assert_same_run(single, two)
