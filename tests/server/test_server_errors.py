"""How EcoDiff errors reach the user through a real ComfyUI server (``execution_error``).

ComfyUI names a failed node's exception ``module.qualname`` (its ``exception_type``, shown with the
message); the module of a custom node pack is its folder's path.  EcoDiff errors must read
``EcoDiff.<Kind>`` with a message that says what to do.  Skipped unless COMFYUI_PATH is set.
"""
from __future__ import annotations

import pytest

from comfy_server import learn_inputs
from ecodiff_core.errors import ERROR_MODULE


def learn_graph(arch: str, run_name: str, **learn) -> dict:
    return {
        "1": {"class_type": "EcoDiffTinyCheckpointLoader", "inputs": {"arch": arch, "seed": 301}},
        "4": {"class_type": "EcoDiffLearnMask",
              "inputs": dict(learn_inputs(run_name=run_name, **learn), model=["1", 0], clip=["1", 1])},
        "5": {"class_type": "EcoDiffSaveMask", "inputs": {"mask": ["4", 0], "filename": f"{run_name}_saved"}},
    }


def empty_prompts() -> dict:
    return learn_graph("sd15", "err_empty", prompts="  \n# only a comment\n")


def bad_keep_ratios() -> dict:
    graph = learn_graph("sd15", "err_ratios", epochs=1, max_prompts=1)
    graph["6"] = {"class_type": "EcoDiffApplyMask", "inputs": {"model": ["1", 0], "mask": ["4", 0],
                                                               "target": "keep_ratios", "sparsity": 0.2,
                                                               "keep_ratios": "head=most", "mode": "prune"}}
    graph["7"] = {"class_type": "EcoDiffPruningReport", "inputs": {"report": ["6", 1]}}
    return graph


def mask_of_another_model() -> dict:
    graph = learn_graph("sd15", "err_other", epochs=1, max_prompts=1)
    graph["20"] = {"class_type": "EcoDiffTinyCheckpointLoader", "inputs": {"arch": "sdxl", "seed": 0}}
    graph["21"] = {"class_type": "EcoDiffApplyMask", "inputs": {"model": ["20", 0], "mask": ["4", 0],
                                                                "target": "params", "sparsity": 0.2,
                                                                "keep_ratios": "head=0.8", "mode": "prune"}}
    graph["22"] = {"class_type": "EcoDiffPruningReport", "inputs": {"report": ["21", 1]}}
    return graph


#: graph, failing node, error class, words of the message that say what to do
CASES = {
    "empty_prompts": (empty_prompts, "4", "EcoDiffError", ("one prompt per line",)),
    "bad_keep_ratios": (bad_keep_ratios, "6", "SettingsError", ("not a number", "head=most")),
    "mask_of_another_model": (mask_of_another_model, "21", "MaskFileError", ()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ecodiff_errors_read_plainly_in_the_ui(server, case):
    build, node_id, kind, words = CASES[case]
    entry = server.run(build(), timeout=300)
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and len(errors) == 1, entry["status"]
    error = errors[0]
    assert error["node_id"] == node_id, error
    assert error["exception_type"] == f"{ERROR_MODULE}.{kind}", error["exception_type"]
    message = error["exception_message"].strip()
    assert message and "Traceback" not in message, message
    assert all(w in message for w in words), message
    assert "custom_nodes" not in error["exception_type"] + message, error
