import json

import pytest
import torch
from safetensors.torch import save_file

from ecodiff_core.errors import MaskFileError
from ecodiff_core.learn_settings import LearnSettings
from ecodiff_core.maskfile import MaskState, load_mask, save_mask
from ecodiff_core.units import Layout, Slice, UnitGroup


def layout(counts=(4, 8), arch="toy") -> Layout:
    groups = tuple(
        UnitGroup(name=f"blocks.{i}:units", kind="head" if i == 0 else "neuron", count=c, width=2,
                  owner=f"blocks.{i}", gates=(Slice(f"blocks.{i}.out", "in"),))
        for i, c in enumerate(counts))
    return Layout(arch=arch, groups=groups)


def learned_state(lay: Layout) -> MaskState:
    state = MaskState.fresh(lay, init_logit=3.0)
    state.logits = {n: torch.randn(t.shape) for n, t in state.logits.items()}
    state.optimizer = {}  # AdamW's state after 3 steps, as the learner writes it
    for n, t in state.logits.items():
        state.optimizer.update({f"step/{n}": torch.tensor(3.0), f"exp_avg/{n}": torch.randn(t.shape),
                                f"exp_avg_sq/{n}": torch.rand(t.shape)})
    state.history = [{"step": 1, "loss": 0.5, "recon": 0.4, "reg": 0.2}]
    state.progress = {"epoch": 1, "position": 4, "step": 3, "finished": False}
    state.settings = LearnSettings(beta=0.5)
    return state


def test_round_trip(tmp_path):
    lay = layout()
    state = learned_state(lay)
    path = save_mask(tmp_path / "m.safetensors", state)
    loaded = load_mask(path, lay)
    assert loaded.fingerprint == lay.fingerprint() and loaded.arch == "toy"
    for name in state.logits:
        assert torch.equal(loaded.logits[name], state.logits[name])
    assert loaded.optimizer.keys() == state.optimizer.keys()
    assert all(torch.equal(loaded.optimizer[k], v) for k, v in state.optimizer.items())
    assert loaded.history == state.history and loaded.progress == state.progress
    assert loaded.settings == state.settings and loaded.kinds == state.kinds
    assert not list(tmp_path.glob("*.tmp"))


def test_other_layout_is_explained(tmp_path):
    path = save_mask(tmp_path / "m.safetensors", learned_state(layout()))
    with pytest.raises(MaskFileError, match="different model layout.*differ in size.*blocks.1:units: mask 8, model 6"):
        load_mask(path, layout(counts=(4, 6)))
    with pytest.raises(MaskFileError, match="not in the mask"):
        load_mask(path, layout(counts=(4, 8, 2)))


def test_truncated_file(tmp_path):
    path = save_mask(tmp_path / "m.safetensors", learned_state(layout()))
    data = path.read_bytes()
    for cut in (3, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(MaskFileError, match="truncated or corrupted"):
            load_mask(bad)


def test_missing_file(tmp_path):
    with pytest.raises(MaskFileError, match="not found"):
        load_mask(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("metadata, message", [
    ({"format": "something-else"}, "not an EcoDiff mask file"),
    ({"format": "ecodiff-mask", "format_version": "99"}, "format version"),
    ({"format": "ecodiff-mask", "format_version": "1", "arch": "toy", "fingerprint": "x", "kinds": "{not json"},
     "damaged metadata"),
    ({"format": "ecodiff-mask", "format_version": "1", "arch": "toy", "fingerprint": "x",
      "kinds": json.dumps({"other": "head"})}, "damaged metadata"),
    ({"format": "ecodiff-mask", "format_version": "1", "fingerprint": "x", "kinds": "{}"}, "damaged metadata"),
])
def test_garbage_metadata(tmp_path, metadata, message):
    path = tmp_path / "g.safetensors"
    save_file({"logits/blocks.0:units": torch.zeros(4)}, str(path), metadata=metadata)
    with pytest.raises(MaskFileError, match=message):
        load_mask(path)


def test_pickle_file_is_not_executed(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(MaskFileError):
        load_mask(path)
