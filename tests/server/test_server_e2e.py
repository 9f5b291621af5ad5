"""End to end through a real ComfyUI server: POST /prompt, /history, websocket progress, /interrupt,
/object_info, /extensions and the example workflows, on tiny random-weight models of ComfyUI's own
SD1.5 / SDXL / FLUX / SD3 classes (built by the test-only pack in tests/server/tiny_models_pack).

Skipped unless COMFYUI_PATH points at a ComfyUI checkout.  One server per module (about 15 s to
start); every wait is bounded; the server is stopped in teardown.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from comfy_server import learn_inputs, learn_prune_compare_graph
from scripts import workflow_check as wc
from scripts import workflow_schema as ws
from workflow_api import to_api

ROOT = Path(__file__).resolve().parent.parent.parent
ECODIFF_NODES = ("EcoDiffLearnMask", "EcoDiffApplyMask", "EcoDiffSaveMask", "EcoDiffLoadMask",
                 "EcoDiffSavePrunedModel", "EcoDiffLoadPrunedModel", "EcoDiffCompare", "EcoDiffPruningReport",
                 "EcoDiffLoraRecover", "EcoDiffDemoModel", "EcoDiffJudgeDigits", "EcoDiffLearnSettings")
#: which tiny architecture stands in for each example workflow's model
EXAMPLE_ARCH = {
    "sdxl_learn_prune_compare": "sdxl",
    "sd15_learn_prune_compare": "sd15",
    "flux_schnell_learn_prune_compare": "flux",
    "flux_dev_learn_prune_compare": "flux",
    "sd35_large_learn_prune_compare": "sd3",
    "shared_mask_apply_sample": "sdxl",
    "demo_digits_learn_prune_compare": "demo",  # the shipped digits model itself (no loader to swap)
    "sd15_learn_prune_recover_compare": "sd15",
}
LOADER_SWAP = {
    "CheckpointLoaderSimple": "EcoDiffTinyCheckpointLoader",
    "UNETLoader": "EcoDiffTinyUNETLoader",
    "DualCLIPLoader": "EcoDiffTinyCLIPLoader",
    "TripleCLIPLoader": "EcoDiffTinyCLIPLoader",
    "CLIPLoader": "EcoDiffTinyCLIPLoader",
    "VAELoader": "EcoDiffTinyVAELoader",
}
RUN_TIMEOUT = 300.0
#: every test that learns gets its own freshly built model (no state carried between tests)
MODEL_SEED = {"ws_progress": 101, "interrupt": 102, "other_model": 103, "alone": 104, "old_widgets": 105,
              **{name: 200 + i for i, name in enumerate(sorted(EXAMPLE_ARCH))}}


# ------------------------------------------------------------------------------------------------
# graphs
# ------------------------------------------------------------------------------------------------
def learn_only_graph(arch: str, run_name: str, save_as: str | None = None, model_seed: int = 0,
                     settings: dict | None = None, **learn) -> dict:
    """Tiny checkpoint -> Learn (an output node: it runs on its own) [-> Save Sparsity Mask when
    ``save_as``]; ``settings`` adds an EcoDiff Learn Settings node with these widgets."""
    graph = {
        "1": {"class_type": "EcoDiffTinyCheckpointLoader", "inputs": {"arch": arch, "seed": model_seed}},
        "4": {"class_type": "EcoDiffLearnMask",
              "inputs": dict(learn_inputs(run_name=run_name, **learn), model=["1", 0], clip=["1", 1])},
    }
    if settings is not None:
        graph["3"] = {"class_type": "EcoDiffLearnSettings", "inputs": settings}
        graph["4"]["inputs"]["settings"] = ["3", 0]
    if save_as:
        graph["5"] = {"class_type": "EcoDiffSaveMask", "inputs": {"mask": ["4", 0], "filename": save_as}}
    return graph


def tiny_variant(prompt: dict, arch: str, tag: str, model_seed: int) -> dict:
    """An example workflow's API prompt with tiny loaders and tiny sizes (same graph otherwise)."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in LOADER_SWAP:
            node["class_type"] = LOADER_SWAP[kind]
            node["inputs"] = {"arch": arch} if "CLIP" in kind or kind == "VAELoader" else {"arch": arch,
                                                                                           "seed": model_seed}
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=64, height=64, batch_size=1)
        elif kind == "EcoDiffLearnMask":
            inputs.update(width=64, height=64, steps=2, max_prompts=2, epochs=1, accumulate=1, resume=False,
                          run_name=f"{inputs['run_name']}_{tag}")
        elif kind == "EcoDiffLoraRecover":
            inputs.update(width=64, height=64, sample_steps=2, max_prompts=2, train_steps=3, rank=2, resume=False,
                          lora_name=f"{inputs['lora_name']}_{tag}")
        elif kind == "EcoDiffApplyMask":
            inputs.update(sparsity=min(inputs["sparsity"], 0.2))  # what the tiny models' units allow
        elif kind == "KSampler":
            inputs.update(steps=2)
        elif kind == "EcoDiffSaveMask":
            inputs.update(filename=f"{inputs['filename']}_{tag}")
    return out


def node_errors(entry: dict) -> str:
    return "\n".join(f"{m[1].get('node_type')} #{m[1].get('node_id')}: {m[1].get('exception_message')}"
                     for m in entry["status"].get("messages", []) if m[0] == "execution_error")


def assert_success(entry: dict) -> None:
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], node_errors(entry) or status


def error_message(entry: dict) -> str:
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, f"expected an execution error, got {entry['status']}"
    return errors[0]["exception_message"]


# ------------------------------------------------------------------------------------------------
# schema and static resources
# ------------------------------------------------------------------------------------------------
def test_object_info_lists_every_ecodiff_node_as_documented(server):
    info = server.object_info()
    missing = [n for n in ECODIFF_NODES if n not in info]
    assert not missing, f"not in /object_info: {missing}\n{server.log_tail()}"
    documented = wc.documented_inputs()
    for name in ECODIFF_NODES:
        node = info[name]
        assert node["category"] == "EcoDiff", name
        names = [s.name for s in ws.schema_inputs(node)]
        assert name in documented, f"{name} is not in docs/nodes.md"
        assert sorted(names) == sorted(documented[name]), f"{name}: server {names} vs docs {documented[name]}"
        untipped = [s.name for s in ws.schema_inputs(node) if not s.options.get("tooltip")]
        assert not untipped, f"{name}: inputs without a tooltip: {untipped}"
        tips = node.get("output_tooltips") or []
        assert len(tips) == len(node["output"]) and all(tips), f"{name}: outputs without a tooltip: {tips}"
    assert "IMPORT FAILED" not in "\n".join(
        line for line in server.log_text().splitlines() if "EcoDiff" in line or "ecodiff" in line)


def test_web_extension_and_workflow_templates_are_served(server):
    scripts = server.get_json("/extensions")
    ours = [s for s in scripts if s.startswith("/extensions/ComfyUI-EcoDiff/")]
    assert "/extensions/ComfyUI-EcoDiff/ecodiff.js" in ours, scripts
    status, body = server.request("GET", "/extensions/ComfyUI-EcoDiff/ecodiff.js")
    assert status == 200 and b"registerExtension" in body and b"ecodiff.learn" in body
    templates = server.get_json("/api/workflow_templates")
    assert sorted(templates.get("ComfyUI-EcoDiff", [])) == sorted(p.stem for p in ws.example_paths()), templates


@pytest.mark.parametrize("path", ws.example_paths(), ids=lambda p: p.stem)
def test_example_workflow_uses_only_known_nodes_and_inputs(server, path):
    info = server.object_info()
    wf = ws.load(path)
    problems = wc.check_structure(wf) + wc.check_against_schemas(wf, info)
    assert not problems, "\n".join(problems)
    assert to_api(wf, info), "empty prompt"


def test_every_example_workflow_has_a_tiny_stand_in():
    assert sorted(EXAMPLE_ARCH) == sorted(p.stem for p in ws.example_paths())


# ------------------------------------------------------------------------------------------------
# running graphs
# ------------------------------------------------------------------------------------------------
def test_learn_apply_sample_compare_with_progress_over_websocket(server):
    run = server.run_with_ws(learn_prune_compare_graph("sdxl", run_name="ws_progress",
                                                       model_seed=MODEL_SEED["ws_progress"]), timeout=RUN_TIMEOUT)
    assert_success(run.history)
    assert run.end == "success"
    events = [e for e in run.of_type("ecodiff.learn")]
    total = 2 * 2  # 2 prompts x 2 epochs, one prompt per optimiser step
    assert [e["step"] for e in events] == list(range(1, total + 1)), events
    for e in events:
        assert str(e["node"]) == "4" and e["total"] == total
        assert math.isfinite(e["loss"]) and math.isfinite(e["recon"]) and math.isfinite(e["reg"])
        assert e["sparsity"] and all(0.0 <= v <= 1.0 for v in e["sparsity"].values()), e
    progress = [p for p in run.of_type("progress") if str(p.get("node")) == "4"]
    assert len(progress) >= total and progress[-1]["value"] == progress[-1]["max"] == total, progress
    outputs = run.history["outputs"]
    compare = outputs["11"]
    for key in ("images", "a_images", "b_images"):
        assert compare.get(key) and compare[key][0]["filename"], (key, compare)
    image = compare["images"][0]
    status, png = server.request("GET", f"/view?filename={image['filename']}&type={image['type']}"
                                        f"&subfolder={image.get('subfolder', '')}")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs["12"].get("text") and outputs["12"].get("images"), outputs["12"]
    assert "4" in outputs and outputs["4"].get("text"), "Learn's ui text"
    assert (server.models / "ecodiff_masks" / ".runs" / "ws_progress.safetensors").is_file()


def test_interrupt_stops_learning_keeps_mask_and_rerun_resumes(server):
    from ecodiff_core.maskfile import load_mask

    graph = learn_only_graph("sdxl", "interrupt_me", model_seed=MODEL_SEED["interrupt"],
                             epochs=200, max_prompts=2)  # 400 steps: far too many
    sent = {}

    def interrupt_after_two(run, msg):
        if msg.get("type") == "ecodiff.learn" and msg["data"]["step"] >= 2 and "at" not in sent:
            sent["at"] = msg["data"]["step"]
            assert run.interrupt() == 200

    run = server.run_with_ws(graph, timeout=RUN_TIMEOUT, on_message=interrupt_after_two)
    assert "at" in sent, "no ecodiff.learn events arrived"
    assert run.end == "execution_interrupted", (run.end, node_errors(run.history))
    assert run.history["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in run.history["status"]["messages"])
    last_step = max(e["step"] for e in run.of_type("ecodiff.learn"))
    assert last_step <= sent["at"] + 2, "learning went on well after the interrupt"
    path = server.models / "ecodiff_masks" / ".runs" / "interrupt_me.safetensors"
    assert path.is_file(), "no mask file after the interrupt"
    state = load_mask(path)
    assert not state.progress.get("finished") and state.progress["step"] >= sent["at"], state.progress

    resumed = {}

    def note_first_step_and_stop(run, msg):
        if msg.get("type") == "ecodiff.learn" and "first" not in resumed:
            resumed["first"] = msg["data"]["step"]
            run.interrupt()

    graph["4"]["inputs"]["resume"] = True
    again = server.run_with_ws(graph, timeout=RUN_TIMEOUT, on_message=note_first_step_and_stop)
    assert resumed.get("first") == state.progress["step"] + 1, (resumed, state.progress)
    assert again.end == "execution_interrupted"


@pytest.mark.parametrize("path", ws.example_paths(), ids=lambda p: p.stem)
def test_example_workflow_runs_on_tiny_models(server, path):
    info = server.object_info()
    arch = EXAMPLE_ARCH[path.stem]
    seed = MODEL_SEED[path.stem]
    prompt = tiny_variant(to_api(ws.load(path), info), arch, tag=path.stem, model_seed=seed)
    for node in prompt.values():  # a shared mask: learn and save one for the tiny model first
        if node["class_type"] == "EcoDiffLoadMask":
            stem = Path(node["inputs"]["mask_name"]).stem
            assert_success(server.run(learn_only_graph(arch, f"shared_{path.stem}", save_as=stem, model_seed=seed,
                                                       epochs=1),
                                      timeout=RUN_TIMEOUT))
    entry = server.run(prompt, timeout=RUN_TIMEOUT)
    assert_success(entry)
    compares = [nid for nid, n in prompt.items() if n["class_type"] == "EcoDiffCompare"]
    assert compares and all(entry["outputs"].get(nid, {}).get("a_images") for nid in compares), entry["outputs"]


def test_workflow_saved_before_the_newer_widgets_runs_with_their_defaults(server):
    """A workflow saved before Apply Pruned Mask had 'align' and Learn Settings 'prompt_batch',
    'objective' and 'warm_start' (fewer widget values, no sockets) queues without them and runs with
    their defaults: one prompt per denoiser call, the per-step objective without warm start, and no
    alignment on the CPU ("auto")."""
    from ecodiff_core.maskfile import load_mask

    added = {"EcoDiffApplyMask": [("align", "auto")],
             "EcoDiffLearnSettings": [("prompt_batch", 1), ("objective", "per_step"), ("warm_start", 0.0)]}
    wf = ws.load(ws.EXAMPLES / "sd15_learn_prune_compare.json")
    for node in wf["nodes"]:
        if node["type"] in added:
            names, defaults = zip(*added[node["type"]], strict=True)
            assert tuple(node["widgets_values"][-len(names):]) == defaults  # the newest widgets come last
            node["widgets_values"] = node["widgets_values"][:-len(names)]
            node["inputs"] = [i for i in node["inputs"] if i["name"] not in names]
    prompt = tiny_variant(to_api(wf, server.object_info()), "sd15", tag="old_widgets",
                          model_seed=MODEL_SEED["old_widgets"])
    kinds = {n["class_type"]: (nid, n["inputs"]) for nid, n in prompt.items()}
    assert set(added) <= set(kinds)
    assert not any(name in kinds[k][1] for k, widgets in added.items() for name, _ in widgets)
    entry = server.run(prompt, timeout=RUN_TIMEOUT)
    assert_success(entry)
    applied = entry["outputs"][kinds["EcoDiffApplyMask"][0]]["text"][0]
    assert "remove 20.0% of parameters" in applied and "aligned" not in applied, applied
    run_name = kinds["EcoDiffLearnMask"][1]["run_name"]
    state = load_mask(server.models / "ecodiff_masks" / ".runs" / f"{run_name}.safetensors")
    assert (state.settings.prompt_batch, state.settings.objective, state.settings.warm_start) == (1, "per_step", 0.0)
    assert state.progress["finished"]


def test_loader_and_learn_alone_run_and_keep_only_saved_masks_in_the_list(server):
    """Learn is an output node (no Save node needed); its run state stays out of the masks list, and
    the expert settings come from an EcoDiff Learn Settings node (accumulate 2 over 2 prompts = one
    optimiser step per epoch)."""
    from ecodiff_core.maskfile import load_mask

    graph = learn_only_graph("sd15", "alone", model_seed=MODEL_SEED["alone"], epochs=3, max_prompts=2,
                             settings={"accumulate": 2, "regularizer": "sigmoid", "lr_heads": 0.3,
                                       "lr_neurons": 0.2, "lr_channels": 0.5, "weight_decay": 0.0,
                                       "gate_temperature": 0.5, "init_logit": 2.0, "noise_offset": 0.1,
                                       "checkpointing": True, "block_checkpointing": "off"})
    entry = server.run(graph, timeout=RUN_TIMEOUT)
    assert_success(entry)
    assert "run state kept" in entry["outputs"]["4"]["text"][0]
    state = load_mask(server.models / "ecodiff_masks" / ".runs" / "alone.safetensors")
    assert state.progress["finished"] and len(state.history) == 3, state.progress
    assert state.settings.accumulate == 2 and state.settings.regularizer == "sigmoid"
    assert state.settings.lr == {"head": 0.3, "neuron": 0.2, "channel": 0.5}
    assert state.settings.gate.temperature == 0.5 and state.settings.gate.init_logit == 2.0
    masks = server.object_info()["EcoDiffLoadMask"]["input"]["required"]["mask_name"]
    names = masks[1]["options"] if isinstance(masks[1], dict) and "options" in masks[1] else masks[0]
    assert not any("alone" in n for n in names), names

    saved = learn_only_graph("sd15", "alone", save_as="alone_kept", model_seed=MODEL_SEED["alone"], epochs=3,
                             max_prompts=2, resume=True)
    assert_success(server.run(saved, timeout=RUN_TIMEOUT))
    masks = server.object_info()["EcoDiffLoadMask"]["input"]["required"]["mask_name"]
    names = masks[1]["options"] if isinstance(masks[1], dict) and "options" in masks[1] else masks[0]
    assert [n for n in names if "alone" in n] == ["alone_kept.safetensors"], names


# ------------------------------------------------------------------------------------------------
# clear errors
# ------------------------------------------------------------------------------------------------
def test_empty_prompts_are_a_clear_error(server):
    graph = learn_only_graph("sd15", "empty", prompts="  \n# only a comment\n")
    message = error_message(server.run(graph, timeout=RUN_TIMEOUT))
    assert "prompt" in message.lower(), message


def test_mask_of_another_model_is_a_clear_error(server):
    graph = learn_only_graph("sd15", "other_model", model_seed=MODEL_SEED["other_model"], epochs=1, max_prompts=1)
    graph["20"] = {"class_type": "EcoDiffTinyCheckpointLoader", "inputs": {"arch": "sdxl", "seed": 0}}
    graph["21"] = {"class_type": "EcoDiffApplyMask", "inputs": {"model": ["20", 0], "mask": ["4", 0],
                                                                "target": "params", "sparsity": 0.2,
                                                                "keep_ratios": "head=0.8", "mode": "prune"}}
    graph["22"] = {"class_type": "EcoDiffPruningReport", "inputs": {"report": ["21", 1]}}
    message = error_message(server.run(graph, timeout=RUN_TIMEOUT))
    assert "different model" in message or "another model" in message or "fingerprint" in message, message


def test_sparsity_out_of_range_is_refused_before_running(server):
    """Apply's branch is refused at validation; Learn, an output node of its own, is still queued."""
    graph = learn_prune_compare_graph("sd15")
    graph["5"]["inputs"]["sparsity"] = 1.5
    status, answer = server.post_json("/prompt", {"prompt": graph})
    assert status == 200 and "5" in answer["node_errors"], answer
    assert "sparsity" in str(answer["node_errors"]["5"]), answer
    assert sorted(answer["node_errors"]["5"]["dependent_outputs"]) == ["11", "12"], answer
