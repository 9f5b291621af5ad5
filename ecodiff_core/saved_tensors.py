"""In-place writes to tensors saved for backward, with tensor and storage names that cannot collide.

Models that add residuals in place (ComfyUI's FLUX blocks) or patch activations in place
(ComfyUI's FreeU / FreeU_V2 write ``h[:, :C/2]``) overwrite tensors autograd saved for the
backward.  ``torch.autograd.graph.allow_mutation_on_saved_tensors`` (torch/autograd/graph.py)
clones a saved tensor before such a write, but it names a tensor by ``(id(obj), data_ptr,
version)`` and a storage by ``(data_ptr, version)`` (both marked FIXME there).  Both names collide:

- after a saved tensor is cloned, the original may be freed; Python reuses its ``id`` and the
  allocator its address, so a new tensor saved at the same version gets the dead tensor's handle
  and the backward reads the clone instead: silently wrong gradients, or shape errors such as
  group_norm's ``Expected X.numel() == N * C * HxW``;
- a write through a view at an offset has another ``data_ptr`` than the saved base, so the base
  is not cloned and the backward reads the new values;
- every meta tensor has ``data_ptr`` 0 (the memory preflight traces on meta).

``allow_mutation_on_saved_tensors`` here is torch's context with collision-free names: a tensor is
named by a serial number that lives as long as its Python object, a storage by its base address
(by the storage object on meta, where there is no address).
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch.autograd import graph
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["allow_mutation_on_saved_tensors"]


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    if t.device.type == "meta":
        return ("object", id(storage))  # the storage object lives as long as the storage
    return ("address", t.device.type, t.device.index, storage.data_ptr())


@contextlib.contextmanager
def allow_mutation_on_saved_tensors() -> Iterator[None]:
    """``torch.autograd.graph.allow_mutation_on_saved_tensors`` with names that cannot collide.

    Run the forward and the backward inside one entry, as with torch's context.  Saved tensors
    are cloned only when written in place (memory grows by the written tensors alone).
    Raises ``RuntimeError`` where torch's context does (a backward outside it).
    """
    if not (hasattr(graph, "_get_tid") and hasattr(graph, "_get_sid")):  # pragma: no cover - torch internals moved
        with graph.allow_mutation_on_saved_tensors():
            yield
        return
    serials: WeakIdKeyDictionary = WeakIdKeyDictionary()
    counter = itertools.count()

    def serial(t: torch.Tensor) -> int:
        number = serials.get(t)
        if number is None:
            number = serials[t] = next(counter)
        return number

    def tensor_id(t: torch.Tensor) -> tuple:
        return (serial(t), _storage_key(t), t._version)

    def storage_id(t: torch.Tensor) -> tuple:
        return (_storage_key(t), t._version)

    get_tid, get_sid = graph._get_tid, graph._get_sid
    graph._get_tid, graph._get_sid = tensor_id, storage_id
    try:
        with graph.allow_mutation_on_saved_tensors():
            yield
    finally:
        graph._get_tid, graph._get_sid = get_tid, get_sid
