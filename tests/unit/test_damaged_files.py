"""Fuzzing the file readers: every damaged mask file and every damaged pruning record ends either in a
successful, usable load or in the engine's own error -- never another exception type.

Deterministic (seeded) and fast; no ComfyUI needed.  The pruned-model file reader as a whole (ComfyUI
class checks, rebuild) is fuzzed in tests/integration/test_damaged_pruned_files.py.
"""
import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ecodiff_core.archs import find_layout
from ecodiff_core.errors import EcoDiffError, MaskFileError
from ecodiff_core.learn import LearnSettings, MaskLearner
from ecodiff_core.maskfile import load_mask, save_mask
from ecodiff_core.pruned_record import PrunedFileError, check_pruned_record, check_record_layout, check_state_dict
from file_damage import header_end, truncations_and_bit_flips
from tiny_models import build

SETTINGS = LearnSettings(epochs=1, accumulate=1, lr={"head": 0.5, "neuron": 0.5, "channel": 0.5})
BAD_JSON = ["", "not json", "null", "1", "-1", "1.5", "true", '"x"', "[]", "{}", "[1, 2]", '{"a": "b"}',
            "NaN", "[" * 5000 + "]" * 5000]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A tiny FLUX model, its layout, and the bytes of a mask file after one real optimiser step."""
    model, _ = build("flux", torch.float32)
    layout = find_layout(model)
    learner = MaskLearner(model, layout, SETTINGS)
    with torch.no_grad():
        for p in learner.logits.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    for p in learner.logits.values():  # one optimiser step, so the file holds AdamW state
        p.grad = torch.ones_like(p)
    learner.optimizer.step()
    state = learner.state
    state.history = [{"step": 1, "loss": 0.5, "recon": 0.4, "reg": 0.1}]
    state.progress = {"epoch": 0, "position": 1, "step": 1, "finished": False}
    state.inputs = {"weights": "abc", "learning": {"beta": 0.5}}
    path = save_mask(tmp_path_factory.mktemp("fuzz") / "good.safetensors", state)
    assert state.optimizer, "the fuzzed file must hold optimizer state"
    return model, layout, path.read_bytes()


def _metadata(data: bytes, tmp_path) -> tuple[dict, dict]:
    path = tmp_path / "_read.safetensors"
    path.write_bytes(data)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return tensors, meta


def _outcome_of_mask(path, model, layout) -> str:
    """'ok' or 'error'; any exception other than MaskFileError fails the test."""
    try:
        state = load_mask(path, layout)
    except MaskFileError:
        return "error"
    learner = MaskLearner(model, layout, SETTINGS, resume=state)  # a loaded mask must be usable
    assert set(learner.logits) == {g.name for g in layout.groups}
    for p in learner.logits.values():  # ... and resumable: the restored optimiser takes a step
        p.grad = torch.ones_like(p)
    learner.optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in learner.logits.values())
    assert isinstance(state.summary(), dict) and isinstance(state.progress["step"], int)
    return "ok"


def _mask_variants(good: bytes, tmp_path):
    """(label, bytes) of damaged mask files: truncations, bit flips, edited metadata and tensors."""
    rng = random.Random(1234)
    end = header_end(good)
    yield from truncations_and_bit_flips(good, rng, (0, 1, 7, 8, 9, 20, end - 1, end, end + 1, len(good) - 1),
                                         random_cuts=12, flips=150, anywhere_every=3)
    yield "header length 2^62", struct.pack("<Q", 1 << 62) + good[8:]
    tensors, meta = _metadata(good, tmp_path)
    json_keys = ("kinds", "settings", "progress", "history", "inputs", "loss_summary")
    for key in sorted(meta):
        yield f"without {key}", _write({k: v for k, v in meta.items() if k != key}, tensors, tmp_path)
        for bad in BAD_JSON if key in json_keys else ["", "x", "1"]:
            yield f"{key}={bad[:12]}", _write({**meta, key: bad}, tensors, tmp_path)
    kinds = json.loads(meta["kinds"])
    first = next(iter(kinds))
    progress = json.loads(meta["progress"])
    edits = {
        "kind unknown": ("kinds", {**kinds, first: "layer"}),
        "kind not a string": ("kinds", {**kinds, first: 3}),
        "group renamed": ("kinds", {**{k: v for k, v in kinds.items() if k != first}, "x": "head"}),
        **{f"progress {k}={v!r}": ("progress", {**progress, k: v})
           for k in ("epoch", "position", "step", "finished") for v in (-1, "1", None, 1.5, [], True)},
        "history of strings": ("history", ["loss"]),
        "history loss string": ("history", [{"loss": "0.5"}]),
        "history loss nan": ("history", [{"loss": float("nan")}]),
    }
    for label, (key, value) in edits.items():
        yield label, _write({**meta, key: json.dumps(value)}, tensors, tmp_path)
    name = next(k for k in tensors if k.startswith("logits/"))
    optim = next(k for k in tensors if k.startswith("optim/"))
    tensor_edits = {
        "logits 2-D": {name: tensors[name][None]},
        "logits int": {name: tensors[name].long()},
        "logits nan": {name: torch.full_like(tensors[name], float("nan"))},
        "logits empty": {name: tensors[name][:0]},
        "logits one short": {name: tensors[name][:-1]},
        "logits one long": {name: torch.cat([tensors[name], tensors[name][:1]])},
        "optimizer without group": {"optim/exp_avg": torch.zeros(2)},
        "optimizer of unknown group": {"optim/exp_avg/nope": torch.zeros(2)},
        "optimizer wrong shape": {optim: torch.zeros(3, 3)},
        "optimizer int": {optim: torch.zeros(tensors[optim].shape, dtype=torch.int64)},
        **_optimizer_edits(tensors),
        "stray tensor": {"other": torch.zeros(1)},
    }
    for label, change in tensor_edits.items():
        yield label, _write(meta, {**tensors, **change}, tmp_path)
    yield "no logits", _write(meta, {k: v for k, v in tensors.items() if not k.startswith("logits/")}, tmp_path)


def _optimizer_edits(tensors: dict) -> dict[str, dict]:
    """Damaged optimizer state: every part of the first group made 0-d, 2-D, fp16, float64, negative,
    NaN; a part removed (from one group and from all); an unknown part."""
    group = next(k for k in tensors if k.startswith("logits/"))[len("logits/"):]
    edits: dict[str, dict] = {}
    for part in ("step", "exp_avg", "exp_avg_sq"):
        key = f"optim/{part}/{group}"
        t = tensors[key]
        edits.update({
            f"optimizer {part} 0-d" if t.ndim else f"optimizer {part} 1-D": {key: t.reshape(-1)[:1].reshape(
                () if t.ndim else (1,))},
            f"optimizer {part} 2-D": {key: t[None]},
            f"optimizer {part} fp16": {key: t.half()},
            f"optimizer {part} float64": {key: t.double()},
            f"optimizer {part} negative": {key: t - 3},
            f"optimizer {part} nan": {key: torch.full_like(t, float("nan"))},
            f"optimizer {part} removed": {key: None},
            f"optimizer {part} removed everywhere": {k: None for k in tensors if k.startswith(f"optim/{part}/")},
        })
    edits["optimizer step 1.5"] = {f"optim/step/{group}": torch.tensor(1.5)}
    edits["optimizer unknown part"] = {f"optim/max_exp_avg_sq/{group}": tensors[f"optim/exp_avg_sq/{group}"].clone()}
    edits["optimizer state removed"] = {k: None for k in tensors if k.startswith("optim/")}
    edits["optimizer only one group"] = {k: None for k in tensors if k.startswith("optim/")
                                         and not k.endswith("/" + group)}
    return edits


def _write(meta: dict, tensors: dict, tmp_path) -> bytes:
    path = tmp_path / "_write.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, str(path), metadata=meta)
    return path.read_bytes()


def test_damaged_mask_files_load_or_give_mask_file_error(learned, tmp_path):
    model, layout, good = learned
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(good)
    assert _outcome_of_mask(path, model, layout) == "ok"
    outcomes = {}
    for label, data in _mask_variants(good, tmp_path):
        path.write_bytes(data)
        outcomes[label] = _outcome_of_mask(path, model, layout)
    accepted = sorted(label for label, outcome in outcomes.items() if outcome == "ok")
    # only bit flips inside tensor data and edits that leave valid values load
    valid_edits = {"arch=x", "arch=1", "format_version=1", "history=[]", "inputs={}", 'inputs={"a": "b"}',
                   "settings={}", 'settings={"a": "b"}', "progress finished=True",
                   "optimizer exp_avg negative", "optimizer state removed"}
    assert [label for label in accepted if not label.startswith(
        ("bit flip", "stop_reason", "loss_summary", "package_version", "without loss_summary",
         "without package_version", "without stop_reason", "without settings", "without progress",
         "without history", "without inputs")) and label not in valid_edits] == []
    assert len(accepted) < len(outcomes) // 2
    # the optimizer state is complete or absent, exactly as the learner writes it: of the optimizer edits,
    # only a valid value (negative first moments) and dropping all of it (no step taken yet) load
    assert [label for label in accepted if label.startswith("optimizer")] == [
        "optimizer exp_avg negative", "optimizer state removed"]


@pytest.mark.parametrize("key", ["kinds", "arch", "fingerprint", "format", "format_version"])
def test_mask_without_required_metadata_is_refused(learned, tmp_path, key):
    model, layout, good = learned
    tensors, meta = _metadata(good, tmp_path)
    path = tmp_path / "m.safetensors"
    path.write_bytes(_write({k: v for k, v in meta.items() if k != key}, tensors, tmp_path))
    with pytest.raises(MaskFileError, match=str(path.name)):
        load_mask(path, layout)


# -- pruning records ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def record(learned):
    _, layout, _ = learned
    gen = torch.Generator().manual_seed(3)
    kept = {g.name: sorted(torch.randperm(g.count, generator=gen)[: max(1, g.count // 2)].tolist())
            for g in layout.groups}
    return {
        "arch": layout.arch, "fingerprint": layout.fingerprint(), "model_config_class": "Flux",
        "unet_config": {"depth": 1, "dtype": {"__dtype__": "float16"}, "axes_dim": [4, 6, 6]},
        "sampling_settings": {"shift": 1.15}, "model_type": "FLUX", "model_class": "Flux",
        "kept": kept, "counts": {g.name: g.count for g in layout.groups}, "silenced": [],
    }


def _record_mutations(record: dict):
    rng = random.Random(99)
    wrong = [None, True, 0, -1, 1.5, float("inf"), "", "x", [], [1], {}, {"a": 1}]
    for key in record:
        yield f"without {key}", {k: v for k, v in record.items() if k != key}
        for value in wrong:
            yield f"{key}={value!r}", {**record, key: value}
    yield "extra key", {**record, "weight_dtype": "float8_e4m3fn", "manual_cast_dtype": "float32",
                        "future": {"x": [1]}}
    precision = {  # manual cast only to a compute dtype; scaled fp8 only float8; float8 weights need a cast
        "manual_cast_dtype float8": {"manual_cast_dtype": "float8_e4m3fn"},
        "manual_cast_dtype float64": {"manual_cast_dtype": "float64"},
        "manual_cast_dtype int8": {"manual_cast_dtype": "int8"},
        "scaled_fp8 float16": {"scaled_fp8": "float16", "manual_cast_dtype": "float32"},
        "float8 weights without cast": {"weight_dtype": "float8_e5m2", "manual_cast_dtype": None},
        "weight float8 without cast": {"weight_dtype": "float8_e4m3fn"},
        "scaled fp8 without cast": {"weight_dtype": "bfloat16", "scaled_fp8": "float8_e4m3fn"},  # valid
    }
    for label, change in precision.items():
        yield label, {**record, **change}
    names = list(record["counts"])
    for value in (-1, 10**9, 1.0, True, "0", None, [0]):
        name = rng.choice(names)
        yield f"kept {name} has {value!r}", {**record, "kept": {**record["kept"], name: [value]}}
    name = names[0]
    yield "kept duplicate", {**record, "kept": {**record["kept"], name: [0, 0]}}
    yield "kept group missing", {**record, "kept": {k: v for k, v in record["kept"].items() if k != name}}
    yield "kept extra group", {**record, "kept": {**record["kept"], "nope": [0]}}
    yield "kept not a list", {**record, "kept": {**record["kept"], name: 0}}
    yield "count zero", {**record, "counts": {**record["counts"], name: 0}}
    yield "count too small", {**record, "counts": {**record["counts"], name: 1}}
    yield "count larger", {**record, "counts": {**record["counts"], name: record["counts"][name] + 1}}
    yield "count string", {**record, "counts": {**record["counts"], name: "4"}}
    yield "silenced unknown", {**record, "silenced": ["nope"]}
    yield "silenced with 2 kept", {**record, "silenced": [name], "kept": {**record["kept"], name: [0, 1]}}
    for dtype in ("load", "Tensor", "_C", "float99", 3, None):
        yield f"dtype {dtype!r}", {**record, "unet_config": {**record["unet_config"], "dtype": {"__dtype__": dtype}}}
    yield "dtype with extra key", {**record, "unet_config": {"dtype": {"__dtype__": "float16", "x": 1}}}
    yield "config nan", {**record, "unet_config": {"depth": float("nan")}}
    yield "class dunder", {**record, "model_config_class": "__class__"}
    yield "class dotted", {**record, "model_config_class": "os.system"}
    text = json.dumps(record)
    for _ in range(60):  # random byte edits of the JSON text that still parse
        pos = rng.randrange(len(text))
        edited = text[:pos] + rng.choice('0123456789-"{}[],:tx ') + text[pos + 1:]
        try:
            yield f"json edit at {pos}", json.loads(edited)
        except json.JSONDecodeError:
            continue


def test_damaged_pruning_records_pass_or_give_pruned_file_error(learned, record):
    _, layout, _ = learned
    assert torch.equal(check_record_layout(check_pruned_record(record, "f"), layout, "f")[layout.groups[0].name],
                       torch.zeros(layout.groups[0].count, dtype=torch.bool).index_fill_(
                           0, torch.tensor(record["kept"][layout.groups[0].name]), True))
    accepted, refused = [], []
    for label, mutated in _record_mutations(record):
        try:
            check_pruned_record(mutated, "f.safetensors")
            keep = check_record_layout(mutated, layout, "f.safetensors")
        except PrunedFileError as exc:
            assert str(exc).startswith("f.safetensors"), (label, exc)
            refused.append(label)
            continue
        assert {n: k.numel() for n, k in keep.items()} == {g.name: g.count for g in layout.groups}, label
        assert all(k.dtype == torch.bool for k in keep.values())
        accepted.append(label)
    # only changes to fields the layout check does not need, or that keep the record valid, pass
    assert "extra key" in accepted
    names = {f"{key}='x'" for key in ("arch", "model_config_class", "model_class", "model_type")}  # checked by the host
    unexpected = [label for label in accepted if not label.startswith(("json edit", "extra key", "unet_config=",
                                                                       "sampling_settings=", "silenced=[]",
                                                                       "scaled fp8 without cast"))
                  and label not in names]
    assert unexpected == []
    assert all(label in refused for label in ("without kept", "kept duplicate", "kept extra group", "count larger",
                                              "dtype 'load'", "class dunder", "class dotted", "arch=None",
                                              "manual_cast_dtype float8", "manual_cast_dtype float64",
                                              "manual_cast_dtype int8", "scaled_fp8 float16",
                                              "float8 weights without cast", "weight float8 without cast"))
    assert "scaled fp8 without cast" in accepted  # scaled-fp8 layers cast themselves


def test_state_dict_must_fit_the_rebuilt_module():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    good = {k: v.detach().clone() for k, v in module.state_dict().items()}
    check_state_dict(module, good, "f")
    bad = {
        "missing": {k: v for k, v in good.items() if k != "0.weight"},
        "unexpected": {**good, "2.weight": torch.zeros(1)},
        "shape": {**good, "0.weight": torch.zeros(3, 2)},
        "dtype": {**good, "0.bias": torch.zeros(2, dtype=torch.int64)},
    }
    for sd in bad.values():
        with pytest.raises(PrunedFileError, match="^f"):
            check_state_dict(module, sd, "f")
    assert issubclass(PrunedFileError, EcoDiffError)


F32, F16, BF16, E4M3 = torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn


@pytest.mark.parametrize("built,cast,stored,ok", [
    # (dtype the record builds the layers in, its manual cast, {tensor: stored dtype}, loads?)
    (F16, None, {}, True),
    (F16, None, {"0.weight": F32}, False),       # the record says fp16 weights, the file holds fp32
    (F32, None, {"0.weight": F16}, False),       # one matrix in another dtype
    (F32, None, {"1.weight": F16}, False),       # a norm in another dtype, computed without a cast
    (F16, None, {"0.bias": F32}, False),         # fp32 bias beside fp16 weights needs a manual cast
    (E4M3, F32, {}, True),
    (E4M3, F32, {"0.bias": F32, "1.weight": F32, "1.bias": F32}, True),  # fp8 matrices, fp32 norms and biases
    (E4M3, BF16, {"1.weight": BF16}, True),      # ... or norms in the compute dtype
    (E4M3, BF16, {"1.weight": F16}, False),      # ... but not in a third dtype
    (E4M3, F32, {"0.weight": F32}, False),       # the matrices must be what the record builds
    (E4M3, F32, {"0.weight": torch.float8_e5m2}, False),
    (E4M3, F32, {"0.bias": torch.int8}, False),
])
def test_stored_dtypes_must_be_what_the_record_builds(built, cast, stored, ok):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2)).to(built)
    sd = {k: v.detach().to(stored.get(k, v.dtype)) for k, v in module.state_dict().items()}
    if ok:
        check_state_dict(module, sd, "f", cast)
    else:
        with pytest.raises(PrunedFileError, match="^f: tensor .* is stored in .* but the record builds it in"):
            check_state_dict(module, sd, "f", cast)
