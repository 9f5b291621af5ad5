"""The example workflows (example_workflows/*.json, ComfyUI UI format) without a server.

Always: the files parse, links agree with node inputs/outputs, each has a note, EcoDiff nodes and inputs
are the documented ones, and the learn -> apply -> sample -> compare wiring is what the notes promise.
With COMFYUI_PATH: node types, sockets, outputs and every widget value (count, order, type, range,
choices) are checked against the node classes' own schemas, loaded in-process.
"""
from __future__ import annotations

import pytest

from scripts import workflow_check as wc
from scripts import workflow_schema as ws
from scripts.comfy_env import SKIP_REASON, comfy_path
from scripts.workflow_layout import overlaps
from workflow_api import to_api

PATHS = ws.example_paths()
LEARN_FLOWS = [p for p in PATHS if "learn" in p.stem]
#: model folder of each loader input (where ComfyUI looks for the file, and where it downloads it)
MODEL_DIRECTORY = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "vae_name": "vae",
                   "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
                   "clip_name3": "text_encoders"}
EXPECTED = {"sdxl_learn_prune_compare", "sd15_learn_prune_compare", "flux_schnell_learn_prune_compare",
            "flux_dev_learn_prune_compare", "sd35_large_learn_prune_compare", "shared_mask_apply_sample",
            "demo_digits_learn_prune_compare", "sd15_learn_prune_recover_compare"}


def by_type(wf: dict, kind: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == kind]


def source(wf: dict, node: dict, input_name: str) -> tuple[int, int] | None:
    """(origin node id, origin slot) feeding ``input_name`` of ``node``."""
    inp = next((i for i in node["inputs"] if i["name"] == input_name), None)
    if inp is None or inp.get("link") is None:
        return None
    link = ws.links_by_id(wf)[inp["link"]]
    return link[1], link[2]


def test_the_promised_workflows_exist():
    assert {p.stem for p in PATHS} == EXPECTED


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_structure_and_links(path):
    wf = ws.load(path)
    problems = wc.check_structure(wf)
    assert not problems, "\n".join(problems)
    assert wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert all(isinstance(n["pos"], list) and len(n["pos"]) == 2 for n in wf["nodes"])


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_has_a_note_and_documented_ecodiff_nodes(path):
    wf = ws.load(path)
    notes = ws.notes(wf)
    assert notes and all(n["widgets_values"] and len(n["widgets_values"][0]) > 80 for n in notes)
    documented = wc.documented_inputs()
    ours = [n for n in wf["nodes"] if n["type"].startswith("EcoDiff")]
    assert ours
    for node in ours:
        assert node["type"] in documented, f"{node['type']} is not in docs/nodes.md"
        unknown = [i["name"] for i in node["inputs"] if i["name"] not in documented[node["type"]]]
        assert not unknown, f"{node['type']} #{node['id']}: undocumented inputs {unknown}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_original_and_pruned_are_sampled_alike_and_compared(path):
    wf = ws.load(path)
    nodes = ws.nodes_by_id(wf)
    apply_ = by_type(wf, "EcoDiffApplyMask")
    samplers = by_type(wf, "KSampler")
    assert len(apply_) == 1 and len(samplers) == 2
    apply_ = apply_[0]
    recover = by_type(wf, "EcoDiffLoraRecover")
    pruned_model = (apply_["id"], 0)
    if recover:  # the pruned model goes through LoRA Recover (taught by the original) before sampling
        assert len(recover) == 1 and source(wf, recover[0], "model") == pruned_model
        assert source(wf, recover[0], "original_model") == source(wf, apply_, "model")
        pruned_model = (recover[0]["id"], 0)
    pruned = [k for k in samplers if source(wf, k, "model") == pruned_model]
    original = [k for k in samplers if source(wf, k, "model") == source(wf, apply_, "model")]
    assert len(pruned) == 1 and len(original) == 1, "one KSampler on the pruned model, one on the original"
    pruned, original = pruned[0], original[0]
    assert pruned["widgets_values"] == original["widgets_values"], "same seed and settings"
    assert pruned["widgets_values"][1] == "fixed", "a fixed seed, so reruns compare the same image"
    for name in ("positive", "negative", "latent_image"):
        assert source(wf, pruned, name) == source(wf, original, name) is not None, name
    compare = by_type(wf, "EcoDiffCompare")
    assert len(compare) == 1
    for side, sampler in (("image_a", original), ("image_b", pruned)):
        decode = nodes[source(wf, compare[0], side)[0]]
        assert decode["type"] == "VAEDecode" and source(wf, decode, "samples") == (sampler["id"], 0), side
    assert by_type(wf, "EcoDiffPruningReport"), "a report of what was removed"


@pytest.mark.parametrize("path", LEARN_FLOWS, ids=lambda p: p.stem)
def test_learning_matches_the_sampling_setup(path):
    wf = ws.load(path)
    learn = by_type(wf, "EcoDiffLearnMask")
    assert len(learn) == 1
    learn = learn[0]
    apply_ = by_type(wf, "EcoDiffApplyMask")[0]
    assert source(wf, apply_, "mask") == (learn["id"], 0)
    assert source(wf, learn, "model") == source(wf, apply_, "model"), "the mask is learned on the model it prunes"
    assert source(wf, learn, "clip") is not None, "calibration prompts need the CLIP"
    values = learn["widgets_values"]
    width, height, cfg, scheduler = values[3], values[4], values[6], values[8]
    latent = [n for n in wf["nodes"] if n["type"] in ("EmptyLatentImage", "EmptySD3LatentImage")]
    assert latent and latent[0]["widgets_values"][:2] == [width, height]
    sampler = by_type(wf, "KSampler")[0]["widgets_values"]
    assert (sampler[3], sampler[5]) == (cfg, scheduler), "learn on the trajectories you sample"
    assert values[0].count("\n") >= 50, "the shipped calibration prompts"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_no_two_nodes_overlap(path):
    wf = ws.load(path)
    assert overlaps(wf) == []
    # the check itself sees an overlap: two nodes at the same place
    first, second = wf["nodes"][0], wf["nodes"][1]
    moved = dict(wf, nodes=[first, dict(second, pos=[first["pos"][0] + 10, first["pos"][1] + 10])])
    assert len(overlaps(moved)) == 1


def model_files(node: dict) -> dict[str, str]:
    """Loader input name -> file name (loaders have no control widgets: values follow widget inputs)."""
    names = [i["name"] for i in node["inputs"] if i.get("widget")]
    return {n: v for n, v in zip(names, node.get("widgets_values") or [], strict=False) if n in MODEL_DIRECTORY}


@pytest.mark.parametrize("path", [p for p in PATHS if "demo" not in p.stem], ids=lambda p: p.stem)
def test_loaders_carry_model_metadata_for_the_download(path):
    wf = ws.load(path)
    loaders = [n for n in wf["nodes"] if model_files(n)]
    assert loaders, "a workflow on a downloaded model has loaders"
    for node in loaders:
        models = {m["name"]: m for m in node["properties"].get("models", [])}
        for input_name, file_name in model_files(node).items():
            where = f"{node['type']} #{node['id']} {input_name}={file_name}"
            assert file_name in models, f"{where}: no properties.models entry"
            model = models[file_name]
            assert model["directory"] == MODEL_DIRECTORY[input_name], where
            # what frontend 1.27 accepts for a download: a .safetensors file from huggingface.co or civitai.com
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + file_name), where
            assert file_name.endswith(".safetensors")
        assert set(models) == set(model_files(node).values()), f"{node['type']} #{node['id']}: stale entries"


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def object_info():
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
    return ws.object_info_in_process()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_nodes_and_widgets_match_the_node_schemas(object_info, path):
    wf = ws.load(path)
    problems = wc.check_against_schemas(wf, object_info)
    assert not problems, "\n".join(problems)
    prompt = to_api(wf, object_info)
    learn = [n for n in prompt.values() if n["class_type"] == "EcoDiffLearnMask"]
    for node in learn:  # widgets_values map to the right names (order), not just the right count
        assert node["inputs"]["sampler_name"] == "euler" and isinstance(node["inputs"]["resume"], bool)
        assert node["inputs"]["run_name"].endswith("_ecodiff")


def test_files_are_what_the_script_writes(object_info):
    """example_workflows/*.json are up to date with scripts/make_example_workflows.py (its --check)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("make_example_workflows",
                                                  ws.ROOT / "scripts" / "make_example_workflows.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    built = script.build_all(object_info)
    assert sorted(built) == sorted(p.stem for p in PATHS)
    stale = [name for name, wf in built.items()
             if json.loads(json.dumps(wf)) != ws.load(ws.EXAMPLES / f"{name}.json")]
    assert not stale, f"out of date, run scripts/make_example_workflows.py: {stale}"
