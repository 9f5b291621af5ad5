"""Memory preflight: the live-bytes counter, meta-trace estimates against CPU runs, the memory CLI."""
import pytest
import torch

from ecodiff_core.__main__ import main
from ecodiff_core.errors import EcoDiffError
from ecodiff_core.memory import (
    LiveBytes,
    StepMemory,
    fit_advice,
    measure_learning_step,
    meta_copy,
    no_cache,
    weight_bytes,
)
from test_learning import make_problem
from tiny_models import MODEL_NAMES


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_live_bytes_counts_new_storages_once_and_frees_them(device):
    base = torch.zeros(100, device=device)  # exists before: not counted
    with LiveBytes() as counter:
        a = torch.ones(256, device=device)  # 1024 bytes
        view = a[10:20].view(2, 5)  # same storage
        a.add_(1)  # in place: nothing new
        b = (base + 1).double()  # 400 (freed at once) then 800
        assert counter.live == 1024 + 800
        del view, a
        c = torch.empty(1000, dtype=torch.uint8, device=device)
        assert counter.live == 800 + 1000
        del b, c
    assert counter.live == 0
    assert counter.peak == 1024 + 400 + 800  # the float intermediate of b lived with a


def test_meta_copy_keeps_classes_shapes_and_dtypes_without_touching_the_model():
    model, *_ = make_problem("flux", 1, False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    copy = meta_copy(model)
    assert type(copy) is type(model)
    for (n, p), (m, q) in zip(model.named_parameters(), copy.named_parameters(), strict=True):
        assert n == m and q.device.type == "meta" and (q.shape, q.dtype) == (p.shape, p.dtype)
    assert weight_bytes(copy) == weight_bytes(model) == sum(p.nbytes for p in model.parameters()) + \
        sum(b.nbytes for b in model.buffers())
    assert all(torch.equal(p, before[n]) and p.device.type == "cpu" for n, p in model.named_parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("blocks", [False, True], ids=["plain", "blocks"])
def test_meta_estimate_is_within_15_percent_of_the_cpu_peak(name, blocks):
    """The preflight traces a meta copy; the reference runs the same step on real CPU tensors."""
    model, layout, denoise, noise, sigmas = make_problem(name, 2, True, dtype=torch.float32)
    measured = measure_learning_step(model, layout, denoise, noise, sigmas, blocks)
    meta = make_problem(name, 2, True, dtype=torch.float32, meta=True)
    estimate = measure_learning_step(meta[0], meta[1], meta[2], meta[3], meta[4], blocks)
    assert measured > 0
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_block_checkpointing_lowers_the_estimate(name):
    meta = make_problem(name, 2, True, dtype=torch.float32, meta=True)
    plain = measure_learning_step(*meta, block_checkpointing=False)
    blocked = measure_learning_step(*meta, block_checkpointing=True)
    assert blocked < 0.7 * plain


def test_fit_advice_names_estimate_free_memory_and_remedies():
    memory = StepMemory(weights=5 * 10**9, activations_plain=12 * 10**9, activations_blocks=10**9)
    text = fit_advice(memory, 8 * 10**9, False, "fp16", "SDXL at 1024×1024")
    for part in ("17.0 GB", "8.0 GB", "block checkpointing on (then about 6.0 GB)", "lower resolution", "fp8"):
        assert part in text
    text = fit_advice(memory, 4 * 10**9, True, "fp8", "x")
    assert "6.0 GB" in text and "turn block checkpointing on" not in text and "fp8 weights" not in text


def totals(capsys, *args):
    assert main(["memory", *args]) == 0
    out = capsys.readouterr().out
    return out, [float(line.split()[1]) for line in out.splitlines() if line.strip().startswith("total:")]


def test_memory_cli_fits_flux_in_16_gb_and_sdxl_in_12_gb(capsys):
    """The issue's targets, traced on full-size meta models (about 10 s per mode on one CPU core)."""
    with no_cache():
        out, (flux,) = totals(capsys, "--arch", "flux-dev", "--width", "1024", "--height", "1024",
                              "--weight-dtype", "fp8", "--block-checkpointing", "on")
        assert "weights:       11.90 GB" in out and flux <= 16.0 and "checkpointing off" not in out
        out, (plain,) = totals(capsys, "--arch", "sdxl", "--cfg", "--weight-dtype", "fp16",
                               "--block-checkpointing", "off")
        blocked = float(out.split("with block checkpointing on:")[1].split()[0])
        assert "weights:        5.13 GB" in out  # 2.57 B parameters in fp16
        assert blocked <= 12.0 < plain


def test_memory_cli_small_model_both_modes(capsys):
    out, (plain, blocked) = totals(capsys, "--arch", "sd15", "--width", "256", "--height", "256")
    assert "sd15 256x256" in out and "weights:" in out and "1.72 GB" in out  # 860 M parameters in bf16
    assert blocked < plain


@pytest.mark.parametrize("args, message", [
    (["--arch", "sd15", "--width", "100"], "multiples of 16"),
    (["--arch", "sd15", "--batch", "0"], "batch"),
    (["--arch", "sd15", "--batch", "99999999999999999999"], "argument --batch: must be an integer <= 4096"),
    (["--arch", "sd15", "--width", "99999999999999999984"], "argument --width: must be an integer <= 16384"),
    (["--arch", "sd15", "--height", "16400"], "argument --height: must be an integer <= 16384"),
    (["--arch", "sd15", "--width", "-99999999999999999984"], "multiples of 16"),
    (["--arch", "sd15", "--batch", "x"], "argument --batch: invalid int value"),
])
def test_memory_cli_rejects_bad_sizes(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


def test_unknown_arch_is_an_ecodiff_error():
    from ecodiff_core.fullsize import build_meta

    with pytest.raises(EcoDiffError, match="choose one of"):
        build_meta("sd4")
