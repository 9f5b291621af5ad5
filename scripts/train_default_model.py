"""Train the embedded default text-to-image model (FLUX transformer + tiny text encoder).

    python scripts/train_default_model.py            # full run, writes the shipped weights
    python scripts/train_default_model.py --steps 300 --out /tmp/try

Rectified flow on the sklearn digits train split: x_t = (1 - t) x0 + t eps with logit-normal t, the
transformer predicts v = eps - x0.  AdamW, linear warmup + cosine decay, EMA, 10 % caption dropout
(empty caption = CFG's unconditional branch).  The EMA weights are written as fp16 safetensors, then
reloaded and evaluated with the judge (run ``scripts/train_judge.py`` first).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: the repository root is where `ecodiff_core` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecodiff_core.embedded.data import load_digit_split, pack
from ecodiff_core.embedded.evaluation import EvalSettings, evaluate_model
from ecodiff_core.embedded.judge import load_judge, real_data_floor
from ecodiff_core.embedded.model import (
    MODEL_FILE,
    WEIGHTS_DIR,
    DefaultModel,
    load_default_model,
    save_default_model,
)
from ecodiff_core.embedded.text import BOS_ID, PAD_ID, TRAIN_TEMPLATES, UNK_ID, VOCAB, caption

NUM_CLASS_TOKENS = 20  # ids 3..22: class words and numerals, never replaced by <unk>


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # whole caption -> "" (unconditional)
    pooled_dropout: float = 0.2  # pooled vector -> that of "" while tokens stay: forces attention to read text
    unk_rate: float = 0.05  # template words -> <unk>, so unknown words in prompts are familiar
    threads: int = 2


def lr_factor(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sample_captions(labels: torch.Tensor, s: TrainSettings, gen: torch.Generator) -> list[str]:
    picks = torch.randint(0, len(TRAIN_TEMPLATES), (len(labels),), generator=gen)
    drop = torch.rand(len(labels), generator=gen) < s.caption_dropout
    return ["" if d else caption(TRAIN_TEMPLATES[int(p)], int(c)) for c, p, d in zip(labels, picks, drop, strict=True)]


def encode_batch(
    model: DefaultModel, texts: list[str], s: TrainSettings, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = model.text_encoder.tokenizer(texts)
    template_word = (ids > UNK_ID + NUM_CLASS_TOKENS) & (ids != PAD_ID) & (ids != BOS_ID)
    ids = torch.where(template_word & (torch.rand(ids.shape, generator=gen) < s.unk_rate), UNK_ID, ids)
    tokens, pooled = model.text_encoder.encode_ids(ids, mask)
    null_pooled = model.encode([""])[1]
    swap = (torch.rand(len(texts), generator=gen) < s.pooled_dropout)[:, None]
    return tokens, torch.where(swap, null_pooled.expand_as(pooled), pooled)


def flow_matching_loss(
    model: DefaultModel, x0: torch.Tensor, texts_enc: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator
) -> torch.Tensor:
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
    eps = torch.randn(x0.shape, generator=gen)
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
    v = model.velocity(x_t, t, *texts_enc)
    return (v - (eps - x0)).square().mean()


@torch.no_grad()
def ema_update(ema: DefaultModel, model: DefaultModel, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1 - d)


def train(s: TrainSettings) -> tuple[DefaultModel, dict[str, float], list[float]]:
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    split = load_digit_split()
    latents, labels = pack(split.train_images), split.train_labels
    model = DefaultModel().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, s))
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(s.steps), desc="train default model")
    for step in bar:
        idx = torch.randint(0, latents.shape[0], (s.batch_size,), generator=gen)
        enc = encode_batch(model, sample_captions(labels[idx], s, gen), s, gen)
        loss = flow_matching_loss(model, latents[idx], enc, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, model, step, s.ema_decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == s.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    timing = {"wall_seconds": time.perf_counter() - t0, "process_cpu_seconds": time.process_time() - c0}
    return ema, timing, losses


def measure(out: Path) -> dict:
    model, judge = load_default_model(out / MODEL_FILE), load_judge()
    base = EvalSettings()
    runs = {
        "cfg1.5_20steps": base,
        "cfg1.5_20steps_seed1": replace(base, seed=1),
        "cfg1.0_20steps": replace(base, cfg=1.0),
        "cfg2.0_20steps": replace(base, cfg=2.0),
        "cfg1.5_5steps": replace(base, steps=5),
        "cfg1.5_10steps": replace(base, steps=10),
        "cfg1.5_20steps_heldout_templates": replace(base, heldout=True),
    }
    report = {}
    for name, settings in runs.items():
        report[name] = evaluate_model(model, judge, settings)
        r = report[name]
        print(f"{name:34s} acc {r['accuracy']:.3f}  conf {r['confidence']:.3f}  "
              f"FD-judge {r['fd_judge']:6.2f}  ({r['sample_seconds']:.1f} s)")
    report["real_data_floor_500"] = real_data_floor(judge, 500, 0)
    print(f"real-data floor (500 real train digits vs test stats): {report['real_data_floor_500']:.2f}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--threads", type=int, default=TrainSettings.threads,
                        help="torch threads; 1 is faster when other processes load the CPU")
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args()
    s = replace(TrainSettings(), steps=args.steps, threads=args.threads)
    torch.set_num_threads(s.threads)
    ema, timing, losses = train(s)
    seconds = timing["wall_seconds"]
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"train_steps": str(s.steps), "train_seconds": f"{seconds:.1f}", "seed": str(s.seed),
            "settings": json.dumps(asdict(s))}
    save_default_model(ema, args.out / MODEL_FILE, info)
    n_tr = sum(p.numel() for p in ema.transformer.parameters())
    n_te = sum(p.numel() for p in ema.text_encoder.parameters())
    print(f"trained {s.steps} steps in {seconds:.0f} s wall, {timing['process_cpu_seconds']:.0f} s process CPU; "
          f"transformer {n_tr:,} + text encoder {n_te:,} params; "
          f"final loss (mean of last 100) {sum(losses[-100:]) / len(losses[-100:]):.4f}; vocab {len(VOCAB)}")
    report = {"settings": asdict(s), **timing, "transformer_params": n_tr,
              "text_encoder_params": n_te, "loss_last100": sum(losses[-100:]) / len(losses[-100:])}
    if not args.no_eval:
        report["eval"] = measure(args.out)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
