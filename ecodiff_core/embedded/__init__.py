"""The project's embedded default text-to-image model and its judge.

A ~2.3 M-param diffusers ``FluxTransformer2DModel`` with a tiny jointly-trained text encoder,
trained with rectified flow on the sklearn 8x8 digits (packed 2x2 -> 16 tokens x 4 channels), and
a small CNN judge giving conditional accuracy, confidence and FD-judge.  Weights ship as safetensors
in ``weights/``; ``scripts/train_default_model.py`` and ``scripts/train_judge.py`` regenerate them.

    model = load_default_model()
    images = model.sample(["a handwritten seven"] * 4, steps=20, cfg=1.5, seed=0)
    judge = load_judge()
    judge.evaluate(images, [7] * 4)
"""
from ..trajectory import Denoiser
from .data import LATENT_SHAPE, DigitSplit, load_digit_split, pack, unpack
from .evaluation import EvalSettings, evaluate_model, evaluation_prompts, generate
from .judge import FeatureStats, Judge, frechet_distance, load_judge, real_data_floor
from .model import (
    TEXT_CONFIG,
    TRANSFORMER_CONFIG,
    DefaultModel,
    WeightsMissingError,
    build_transformer,
    initial_noise,
    load_default_model,
    sigmas,
)
from .text import (
    CALIBRATION_LABELS,
    CALIBRATION_PROMPTS,
    CLASS_NAMES,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    Tokenizer,
    calibration_prompts,
    captions_for_class,
)

__all__ = [
    "CALIBRATION_LABELS", "CALIBRATION_PROMPTS", "CLASS_NAMES", "HELDOUT_TEMPLATES", "LATENT_SHAPE",
    "TEXT_CONFIG", "TRAIN_TEMPLATES", "TRANSFORMER_CONFIG", "DefaultModel", "Denoiser", "DigitSplit",
    "EvalSettings", "FeatureStats", "Judge", "Tokenizer", "WeightsMissingError", "build_transformer",
    "calibration_prompts", "captions_for_class", "evaluate_model", "evaluation_prompts",
    "frechet_distance", "generate", "initial_noise", "load_default_model", "load_digit_split", "load_judge",
    "pack", "real_data_floor", "sigmas", "unpack",
]
