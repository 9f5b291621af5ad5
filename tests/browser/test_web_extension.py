"""The web extension (web/ecodiff.js) in ComfyUI's real frontend, in headless Chromium.

Starts ComfyUI as the server tests do (this pack + the tiny-models test pack), then runs
``ui_check.cjs`` (playwright-core) which: checks the extension registered; adds a Learn Sparsity Mask
node and finds the chart widget and the result box (neither saved nor sent with the prompt) and its seed
control (fixed); feeds the chart synthetic events; runs the demo workflow, shortened and with Save nodes
added, queued from the page: real ``ecodiff.learn`` events draw the chart, every text result (Learn's
summary, the saved paths, the report's table, the judge) is visible in its node, Compare opens the slider
view and the Pruning Report its full-size view; loads every example workflow: the missing-models dialog
offers each model's download, the layout is the file's (no node grows, none overlaps) and it saves back
unchanged.  Screenshots are written to a temporary folder (printed with -s); with
``ECODIFF_DOCS_IMAGES=<folder>`` the README's screenshots are copied there too (docs/images).

Needs COMFYUI_PATH, ComfyUI's frontend package (comfyui-frontend-package), Node.js, Chromium
(``apt-get install chromium`` or CHROMIUM_PATH) and playwright-core resolvable by Node (``npm i
playwright-core`` in a folder outside the repository, then NODE_PATH=<that folder>/node_modules);
skipped with the reason otherwise.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import comfy_server
from scripts import workflow_schema as ws
from scripts.comfy_env import SKIP_REASON, comfy_path
from workflow_api import to_api

SCRIPT = Path(__file__).resolve().parent / "ui_check.cjs"
EXTENSION_URL = "/extensions/ComfyUI-EcoDiff/"
DEMO = ws.EXAMPLES / "demo_digits_learn_prune_compare.json"
RUN = {"max_prompts": 5, "epochs": 2, "accumulate": 1}  # 10 optimiser steps of the digits model
#: screenshots of the run -> README images (docs/images), copied when ECODIFF_DOCS_IMAGES names a folder
DOCS_IMAGES = {"live_chart.png": "learn_live_chart.png", "compare_view.png": "compare_view.png",
               "report_view_clip.png": "pruning_report_view.png",
               "workflow_demo_digits_learn_prune_compare.png": "demo_digits_workflow.png"}
#: text each result box must show after the run (besides the node's exact ui text)
RESULT_WORDS = {
    "EcoDiffLearnMask": ("optimiser steps", "run state kept in models/"),
    "EcoDiffSaveMask": ("saved browser_mask.safetensors to models/ecodiff_masks",),
    "EcoDiffSavePrunedModel": ("saved browser_pruned.safetensors to models/ecodiff_pruned",),
    "EcoDiffPruningReport": ("parameters:", "removed params", "block"),
    "EcoDiffJudgeDigits": ("accuracy",),
}


def chromium_path() -> str | None:
    candidates = [os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome")]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def missing_requirement() -> str | None:
    if comfy_path() is None:
        return SKIP_REASON
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        return ("comfyui-frontend-package is not installed (it comes with ComfyUI's requirements.txt): "
                "the server would have no frontend to test")
    if shutil.which("node") is None:
        return "Node.js is not installed (needed to run playwright-core)"
    if chromium_path() is None:
        return "Chromium not found: apt-get install chromium, or set CHROMIUM_PATH (no browser is downloaded)"
    probe = subprocess.run(["node", "-e", "require.resolve('playwright-core')"], capture_output=True, text=True,
                           cwd=SCRIPT.parent, timeout=60, check=False)
    if probe.returncode != 0:
        return ("playwright-core is not resolvable by Node: run `npm i playwright-core` in a folder outside the "
                "repository and set NODE_PATH=<that folder>/node_modules")
    return None


@contextlib.contextmanager
def one_thread():
    """One intra-op thread for the server unless OMP_NUM_THREADS says otherwise (as
    tests/server/test_demo_workflow.py): the digits model gains nothing from more, and on a shared CPU
    spinning OpenMP threads cost far more."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        yield


@pytest.fixture(scope="module")
def ui_results(tmp_path_factory):
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfy_browser")
    shots = tmp_path_factory.mktemp("screenshots")
    with one_thread(), comfy_server.ComfyServer(base) as server:
        graph, ids = run_graph(server.object_info())
        config = {
            "url": server.url, "chromium": chromium_path(), "out_dir": str(shots), "timeout_ms": 600_000,
            "api_prompt": graph, "learn_id": ids["EcoDiffLearnMask"], "compare_id": ids["EcoDiffCompare"],
            "report_id": ids["EcoDiffPruningReport"], "text_ids": [ids[k] for k in RESULT_WORDS],
            "expected_steps": RUN["max_prompts"] * RUN["epochs"] // RUN["accumulate"],
            "workflows": {p.stem: ws.load(p) for p in ws.example_paths()},
        }
        config_path = base / "ui_check_config.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        try:
            proc = subprocess.run(["node", str(SCRIPT), str(config_path)], capture_output=True, text=True,
                                  timeout=1200, cwd=SCRIPT.parent, check=False)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"ui_check.cjs did not finish in {exc.timeout} s\n{server.log_tail()}")
        object_info = server.object_info()
        history = server.get_json("/history")
        log = server.log_tail(4000)
    print(f"\nbrowser screenshots: {shots}")
    try:
        results = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"ui_check.cjs printed no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}\n{log}")
    assert "fatal" not in results, f"{results['fatal']}\nconsole: {results['console'][-30:]}\n{log}"
    results["_object_info"] = object_info
    results["_shots"] = shots
    results["_ids"] = ids
    runs = [h for h in history.values() if set(h.get("outputs", {})) >= {ids["EcoDiffPruningReport"]}]
    results["_outputs"] = runs[-1]["outputs"] if runs else {}
    docs = os.environ.get("ECODIFF_DOCS_IMAGES")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        for shot, name in DOCS_IMAGES.items():
            if (shots / shot).is_file():
                shutil.copyfile(shots / shot, Path(docs) / name)
    return results


def run_graph(object_info: dict) -> tuple[dict, dict[str, str]]:
    """The demo workflow's prompt, shortened (RUN), with Save Sparsity Mask and Save Pruned Model added;
    and the node id of each EcoDiff node type (the first, for the judge)."""
    prompt = to_api(ws.load(DEMO), object_info)
    ids: dict[str, str] = {}
    for nid, node in prompt.items():
        ids.setdefault(node["class_type"], nid)
    prompt[ids["EcoDiffLearnMask"]]["inputs"].update(RUN, run_name="browser_run", resume=False)
    prompt[ids["EmptyLatentImage"]]["inputs"]["batch_size"] = 10
    ids["EcoDiffSaveMask"], ids["EcoDiffSavePrunedModel"] = "101", "102"
    prompt["101"] = {"class_type": "EcoDiffSaveMask",
                     "inputs": {"mask": [ids["EcoDiffLearnMask"], 0], "filename": "browser_mask"}}
    prompt["102"] = {"class_type": "EcoDiffSavePrunedModel",
                     "inputs": {"model": [ids["EcoDiffApplyMask"], 0], "filename": "browser_pruned"}}
    return prompt, ids


def ours(messages: list[str]) -> list[str]:
    return [m for m in messages if "ecodiff" in m.lower() and not m.startswith(("log:", "debug:", "info:"))]


def test_extension_is_registered_without_errors(ui_results):
    ext = ui_results["steps"]["extension"]
    assert ext["registered"], f"EcoDiff.UI not in app.extensions; custom extensions: {ext['all']}"
    assert ext["version"]
    assert any("[EcoDiff] web extension" in m for m in ui_results["console"]), "no console marker"
    assert not ours(ui_results["pageErrors"]), ours(ui_results["pageErrors"])
    assert not [m for m in ours(ui_results["console"]) if m.startswith("error")], ours(ui_results["console"])


def test_learn_node_gets_a_chart_and_a_result_box_that_are_neither_saved_nor_sent(ui_results):
    learn = ui_results["steps"]["learnNode"]
    assert learn["chart"] and learn["chartIsLast"] and learn["chartHeight"] >= 100, learn
    assert learn["resultBox"], learn["widgetNames"]
    slots = ws.widget_slots(ui_results["_object_info"]["EcoDiffLearnMask"])
    assert learn["savedValues"] == len(slots), "the chart and the result box must not add widgets_values entries"
    assert learn["sentInputs"] is not None
    assert not {"ecodiff_chart", "ecodiff_result"} & set(learn["sentInputs"]), learn["sentInputs"]
    assert learn["fits"], "the node is tall enough for its widgets and the chart"
    assert (ui_results["_shots"] / "learn_node_empty.png").is_file()


def test_a_new_learn_node_keeps_its_seed_fixed(ui_results):
    learn = ui_results["steps"]["learnNode"]
    assert learn["samplerControl"] == "randomize", "the frontend's default for seeds (KSampler), for contrast"
    assert learn["seedControl"] == "fixed" and learn["savedControl"] == "fixed", learn
    assert learn["reloadedControl"] == "randomize", "a workflow saved with another choice keeps it"


def test_chart_follows_learn_events(ui_results):
    synthetic = ui_results["steps"]["synthetic"]
    assert synthetic == {"points": 12, "total": 12, "done": True}, synthetic
    run = ui_results["steps"]["tinyRun"]
    assert "error" not in (run["waited"] or {}), run["waited"]
    state = run["learnState"]
    steps = RUN["max_prompts"] * RUN["epochs"] // RUN["accumulate"]
    assert state and state["points"] == steps and state["total"] == steps, state
    assert math.isfinite(state["last"]["loss"]) and state["last"]["sparsity"], state
    assert (ui_results["_shots"] / "tiny_run.png").is_file() and (ui_results["_shots"] / "live_chart.png").is_file()


@pytest.mark.parametrize("node_type", sorted(RESULT_WORDS))
def test_text_results_are_visible_in_their_nodes(ui_results, node_type):
    run = ui_results["steps"]["tinyRun"]
    assert "error" not in (run["waited"] or {}), run["waited"]
    node_id = ui_results["_ids"][node_type]
    box = run["texts"][node_id]
    assert box["widget"], f"{node_type} has no result box"
    sent = ui_results["_outputs"][node_id]["text"]
    assert box["value"] == "\n\n".join(sent) == box["domValue"], (box, sent)
    assert all(word in box["value"] for word in RESULT_WORDS[node_type]), box["value"]
    assert box["visible"], f"{node_type}: the result box is not on screen or is covered"
    assert box["readOnly"] and box["serialize"] is False and not box["sentWithPrompt"], box
    assert (ui_results["_shots"] / f"result_{node_id}.png").is_file()


def test_pruning_report_opens_a_readable_view(ui_results):
    report = ui_results["steps"]["tinyRun"]["report"]
    assert report["button"] and report["overlay"], report
    node_id = ui_results["_ids"]["EcoDiffPruningReport"]
    assert report["table"] == "\n\n".join(ui_results["_outputs"][node_id]["text"])
    assert len(report["charts"]) == 1, report["charts"]
    chart = report["charts"][0]
    assert chart["natural"][0] >= 600 and chart["shown"] == chart["natural"], "the chart at its real size"
    assert report["closed"], "Escape closes the view"
    assert (ui_results["_shots"] / "report_view.png").is_file()


def test_compare_node_opens_a_slider_view(ui_results):
    overlay = ui_results["steps"]["tinyRun"]["overlay"]
    assert overlay["button"] and overlay["overlay"], overlay
    assert overlay["images"] == 2 and overlay["loaded"] == 2, overlay
    assert overlay["split"] == "0.500" and abs(float(overlay["splitAfterMove"]) - 0.3) < 0.05, overlay
    assert overlay["closed"], "Escape closes the view"
    assert (ui_results["_shots"] / "compare_overlay.png").is_file()


@pytest.mark.parametrize("name", [p.stem for p in ws.example_paths()])
def test_example_workflow_round_trips_through_the_frontend(ui_results, name):
    r = ui_results["steps"]["workflows"][name]
    assert r["missing"] == [], f"unknown node types in the frontend: {r['missing']}"
    assert r["valueDiffs"] == [], "\n".join(r["valueDiffs"])
    assert r["linksEqual"], "links changed on load/save"
    assert r["charts"] == r["learners"], "every Learn node shows the chart"
    assert not r["promptHasChart"] and not r["promptHasResult"]
    assert r["fit"] == [], r["fit"]
    assert r["grown"] == [], "nodes are smaller in the file than the frontend draws them"
    assert r["overlaps"] == [], "overlapping nodes"
    assert not ours(r["pageErrors"]), r["pageErrors"]
    assert (ui_results["_shots"] / f"workflow_{name}.png").is_file()


@pytest.mark.parametrize("name", [p.stem for p in ws.example_paths()])
def test_example_workflow_offers_the_download_of_its_models(ui_results, name):
    r = ui_results["steps"]["workflows"][name]
    wf = ws.load(ws.EXAMPLES / f"{name}.json")
    models = {str(n["id"]): n["properties"]["models"] for n in wf["nodes"] if n["properties"].get("models")}
    assert {k: sorted(v) for k, v in r["models"].items()} == \
        {k: sorted(f"{m['directory']} / {m['name']}" for m in v) for k, v in models.items()}, "metadata kept on load"
    if not models:  # the demo workflow needs no download
        assert "demo" in name and r["dialog"] is None, r["dialog"]
        return
    dialog = r["dialog"]
    assert dialog, "no missing-models dialog"
    assert dialog["errors"] == [], dialog["errors"]
    every = [m for ms in models.values() for m in ms]
    for m in every:
        assert f"{m['directory']} / {m['name']}" in dialog["text"], (m, dialog["text"])
    assert sorted(dialog["downloads"]) == sorted({m["url"] for m in every}), dialog
