"""A small CNN judge for 8x8 digits: conditional accuracy, confidence and FD-judge.

FD-judge is the Frechet distance between Gaussians fitted to the judge's 128-d penultimate (ReLU)
features.  It is *not* FID: the feature network is this judge, trained on the digits train split.
The reference statistics are those of the 300-image real test split and ship with the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingsError, WeightsMissingError
from ..safetensors_file import read, write_atomic
from .data import NUM_CLASSES, load_digit_split

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
JUDGE_FILE = "judge.safetensors"
STATS_FILE = "judge_reference_stats.safetensors"
FEATURE_DIM = 128
FLOOR_SIZE = 500


class JudgeNet(nn.Module):
    """conv32 - conv64 - maxpool - fc128 (features) - fc10; ~0.15 M params."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(images))


@dataclass(frozen=True)
class FeatureStats:
    """Mean (d,) and covariance (d, d) of judge features, float64 numpy."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @staticmethod
    def of(features: torch.Tensor | np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        return FeatureStats(f.mean(0), np.cov(f, rowvar=False), int(f.shape[0]))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), robust to singular covariances.

    tr (S_a S_b)^1/2 equals the sum of square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a
    symmetric PSD matrix, so only symmetric eigen-decompositions are needed (negative round-off
    eigenvalues are clipped to zero).
    """
    w, u = np.linalg.eigh(a.cov)
    root_a = (u * np.sqrt(np.clip(w, 0.0, None))) @ u.T
    middle = root_a @ b.cov @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = a.mean - b.mean
    return max(0.0, float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * tr_sqrt))


class Judge:
    """Frozen judge network plus the real test-set feature statistics."""

    def __init__(self, net: JudgeNet, reference: FeatureStats) -> None:
        self.net = net.eval().requires_grad_(False)
        self.reference = reference

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        feats, probs = [], []
        for chunk in images.float().cpu().split(batch):
            f = self.net.features(chunk)
            feats.append(f)
            probs.append(self.net.fc2(f).softmax(-1))
        return torch.cat(feats), torch.cat(probs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of images (N, 1, 8, 8) in [-1, 1]."""
        return self._run(images)[0]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 10)."""
        return self._run(images)[1]

    def fd_judge(self, images: torch.Tensor) -> float:
        """FD-judge of ``images`` against the real test-set statistics."""
        return frechet_distance(FeatureStats.of(self.features(images)), self.reference)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | list[int]) -> dict[str, float]:
        """accuracy: argmax == requested label; confidence: mean probability of the requested label;
        fd_judge: Frechet distance in judge feature space vs the real test set (not FID)."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise SettingsError(f"{images.shape[0]} images but {labels.shape[0]} labels; give one label per image")
        feats, probs = self._run(images)
        return {
            "accuracy": float((probs.argmax(-1) == labels).float().mean()),
            "confidence": float(probs.gather(1, labels[:, None]).mean()),
            "fd_judge": frechet_distance(FeatureStats.of(feats), self.reference),
        }


def stratified_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` random items of each class (without replacement), seeded."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).reshape(-1)
        if len(idx) < per_class:
            raise SettingsError(f"class {c} has only {len(idx)} items, {per_class} requested; ask for at most "
                                f"{len(idx)} per class")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


def real_data_floor(judge: Judge | None = None, n: int = FLOOR_SIZE, seed: int = 0) -> float:
    """FD-judge of ``n`` real train-split digits (n/10 per class) vs the test statistics.

    The best FD-judge a model can expect from ``n`` samples: the Frechet distance is biased upward
    at small sample sizes, so compare generated sets to this floor at the same ``n``.
    """
    judge = judge or load_judge()
    split = load_digit_split()
    idx = stratified_subset(split.train_labels, n // NUM_CLASSES, seed)
    return judge.fd_judge(split.train_images[idx])


def save_judge(net: JudgeNet, reference: FeatureStats, weights_dir: Path | str = WEIGHTS_DIR,
               metadata: dict[str, str] | None = None) -> None:
    weights_dir = Path(weights_dir)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}
    write_atomic(weights_dir / JUDGE_FILE, tensors, metadata or {})
    stats = {"mean": torch.from_numpy(reference.mean), "cov": torch.from_numpy(reference.cov)}
    write_atomic(weights_dir / STATS_FILE, stats, {"count": str(reference.count), "split": "test"})


def load_judge(weights_dir: Path | str | None = None) -> Judge:
    """The shipped judge and its reference statistics (safetensors, float32 net, float64 stats)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    for name in (JUDGE_FILE, STATS_FILE):
        if not (weights_dir / name).is_file():
            raise WeightsMissingError(
                f"judge file {weights_dir / name} not found; regenerate it with `python scripts/train_judge.py`"
            )
    net = JudgeNet()
    weights, _ = read(weights_dir / JUDGE_FILE, what="judge file")
    net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    stats, meta = read(weights_dir / STATS_FILE, what="judge statistics file")
    count = int(meta.get("count", "0"))
    reference = FeatureStats(stats["mean"].double().numpy(), stats["cov"].double().numpy(), count)
    return Judge(net, reference)
