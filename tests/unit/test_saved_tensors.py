"""In-place writes to saved tensors: gradients equal the ones of the same computation without the writes."""
import pytest
import torch
from torch.autograd import graph

from ecodiff_core.saved_tensors import allow_mutation_on_saved_tensors


def _layers(w: torch.Tensor, n: int, write_in_place: bool) -> torch.Tensor:
    """Group norms over activations that are then overwritten in place and freed, as ComfyUI's
    FreeU patch does between UNet blocks; every freed tensor's id and address are up for reuse."""
    x = torch.ones(4, 8, dtype=w.dtype)
    for _ in range(n):
        h = x * w
        g = torch.nn.functional.group_norm(h.view(1, 4, 8), 2)  # saves h
        if write_in_place:
            h.mul_(0.5)
        del h
        k = x[:2] * w[:2]
        x = g.view(4, 8) * 0.9 + k.sum() * 0.01
    return x.square().sum()


def test_freed_tensors_never_lend_their_clone_to_new_ones():
    """torch's own names let a new tensor take a freed one's saved clone (wrong gradients about one
    run in twenty here, or shape errors); these gradients are exact in every run."""
    w = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reference = torch.autograd.grad(_layers(w, 30, False), w)[0]
    for _ in range(40):
        with allow_mutation_on_saved_tensors():
            grad = torch.autograd.grad(_layers(w, 30, True), w)[0]
        torch.testing.assert_close(grad, reference, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tensors_made_after_others_died_get_new_names(device):
    with allow_mutation_on_saved_tensors():
        names = set()
        for _ in range(200):
            t = torch.empty(64, device=device)
            names.add(graph._get_tid(t))
            del t
    assert len(names) == 200


def test_a_write_through_an_offset_view_keeps_the_saved_base():
    w = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with allow_mutation_on_saved_tensors():
        h = w * 1
        y = h.sin()  # saves h
        h[2:].mul_(0)  # another data_ptr than h's
        grad = torch.autograd.grad(y.sum(), w)[0]
    torch.testing.assert_close(grad, w.detach().cos(), rtol=0, atol=0)


def test_meta_storages_are_told_apart():
    with allow_mutation_on_saved_tensors():
        a, b = torch.empty(3, device="meta"), torch.empty(3, device="meta")
        assert graph._get_sid(a) != graph._get_sid(b)
        assert graph._get_sid(a[1:]) == graph._get_sid(a)


def test_torch_names_are_restored_on_exit_and_on_error():
    before = graph._get_tid, graph._get_sid
    with allow_mutation_on_saved_tensors():
        assert graph._get_tid is not before[0]
    assert (graph._get_tid, graph._get_sid) == before
    with pytest.raises(ZeroDivisionError), allow_mutation_on_saved_tensors():
        1 / 0  # noqa: B018
    assert (graph._get_tid, graph._get_sid) == before
