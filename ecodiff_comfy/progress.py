"""Progress, interruption and UI messages of long-running nodes (learning, LoRA Recover).

Facts this relies on (ComfyUI 0.3.64): ``comfy.utils.ProgressBar`` reports to the UI of the node
whose id it is given; ``comfy.model_management.throw_exception_if_processing_interrupted`` raises
``InterruptProcessingException`` after POST /interrupt; ``server.PromptServer.instance.send_sync``
sends a websocket event (no server runs in scripts and tests).  ComfyUI is imported lazily.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class Progress:
    """ComfyUI's progress bar for one node; every update is also an interrupt point."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id) if node_id is not None \
            else comfy.utils.ProgressBar(total)

    def update(self, value: int, total: int | None = None) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(value, total)


def notify(event: str, data: dict) -> None:
    """Send a websocket event to the UI when a server runs (no-op in scripts and tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


@contextlib.contextmanager
def state_kept_on_stop(latest: Callable[[], Any], on_stop: Callable[[Any], None] | None) -> Iterator[None]:
    """When the block raises (ComfyUI's interrupt comes through ``Progress.update``), hand the
    latest good state (``latest()``: a ``MaskState`` or ``RecoverState``) to ``on_stop`` with its
    ``stop_reason`` set ("interrupted after step N" unless it has one), then let the error go on."""
    try:
        yield
    except BaseException:
        if on_stop is not None:
            state = latest()
            state.stop_reason = state.stop_reason or f"interrupted after step {state.progress.get('step', 0)}"
            on_stop(state)
        raise
