"""EcoDiff errors read plainly where ComfyUI shows them: ``module.qualname`` of the exception class
(execution.py's ``full_type_name``) is ``EcoDiff.<Kind>``, not the path of the pack's folder."""
from __future__ import annotations

import importlib
import pkgutil
import traceback

import pytest

import ecodiff_core
from ecodiff_core.errors import ERROR_MODULE, EcoDiffError, MaskFileError
from ecodiff_core.maskfile import load_mask


def comfy_type_name(cls: type) -> str:
    """What ComfyUI 0.3.64 sends as exception_type (execution.full_type_name)."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *all_subclasses(sub)]
    return out


def engine_errors() -> list[type]:
    for info in pkgutil.walk_packages(ecodiff_core.__path__, "ecodiff_core."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    return [EcoDiffError, *all_subclasses(EcoDiffError)]


@pytest.mark.parametrize("cls", engine_errors(), ids=lambda c: c.__name__)
def test_every_engine_error_has_the_short_name(cls):
    assert comfy_type_name(cls) == f"{ERROR_MODULE}.{cls.__name__}"
    assert issubclass(cls, ValueError)


def test_a_subclass_defined_elsewhere_gets_it_too():
    class LocalError(MaskFileError):
        pass

    assert LocalError.__module__ == ERROR_MODULE
    assert comfy_type_name(LocalError).startswith(f"{ERROR_MODULE}.")


def test_an_engine_error_prints_as_a_plain_message(tmp_path):
    with pytest.raises(MaskFileError) as info:
        load_mask(tmp_path / "missing.safetensors")
    last = traceback.format_exception_only(info.type, info.value)[-1].strip()
    assert last.startswith(f"{ERROR_MODULE}.MaskFileError: ") and "missing.safetensors" in last
    assert comfy_type_name(info.type) == f"{ERROR_MODULE}.MaskFileError"
