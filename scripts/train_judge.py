"""Train the digit judge CNN and write its weights and reference statistics.

    python scripts/train_judge.py

Writes ``ecodiff_core/embedded/weights/judge.safetensors`` and ``judge_reference_stats.safetensors``
(mean/covariance of judge features on the real test split).  Seeded; about half a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: the repository root is where `ecodiff_core` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecodiff_core.embedded.data import load_digit_split, shift_augment
from ecodiff_core.embedded.judge import (
    WEIGHTS_DIR,
    FeatureStats,
    Judge,
    JudgeNet,
    load_judge,
    real_data_floor,
    save_judge,
)


@dataclass(frozen=True)
class JudgeTrainSettings:
    seed: int = 0
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    threads: int = 2


def train(settings: JudgeTrainSettings) -> tuple[JudgeNet, float]:
    torch.manual_seed(settings.seed)
    split = load_digit_split()
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n = split.train_images.shape[0]
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(settings.seed)
    t0 = time.perf_counter()
    for _ in tqdm(range(settings.epochs), desc="judge epochs"):
        net.train()
        for idx in torch.randperm(n, generator=gen).split(settings.batch_size):
            images = shift_augment(split.train_images[idx], gen, settings.max_shift)
            loss = F.cross_entropy(net(images), split.train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval(), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--threads", type=int, default=JudgeTrainSettings.threads,
                        help="torch threads; 1 is faster when other processes load the CPU")
    args = parser.parse_args()
    settings = replace(JudgeTrainSettings(), threads=args.threads)
    torch.set_num_threads(settings.threads)
    net, seconds = train(settings)
    split = load_digit_split()
    with torch.no_grad():
        test_acc = float((net(split.test_images).argmax(-1) == split.test_labels).float().mean())
        reference = FeatureStats.of(net.features(split.test_images))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"test_accuracy": f"{test_acc:.4f}", "train_seconds": f"{seconds:.1f}", "seed": str(settings.seed)}
    save_judge(net, reference, args.out, meta)
    judge: Judge = load_judge(args.out)
    print(f"judge: {sum(p.numel() for p in net.parameters()):,} params, {seconds:.1f} s, test accuracy {test_acc:.4f}")
    print(f"FD-judge real test vs its own stats: {judge.fd_judge(split.test_images):.3f}")
    print(f"FD-judge all train ({split.train_images.shape[0]}) vs test: {judge.fd_judge(split.train_images):.2f}")
    for seed in range(3):
        print(f"real-data floor (500 train, 50/class, seed {seed}): {real_data_floor(judge, 500, seed):.2f}")
    print(f"real-data floor (300 train, 30/class, seed 0): {real_data_floor(judge, 300, 0):.2f}")


if __name__ == "__main__":
    main()
