"""The web extension (web/ecodiff.js) in ComfyUI's real frontend, in headless Chromium.

Starts ComfyUI as the server tests do (this pack + the tiny-models test pack), then runs
``ui_check.cjs`` (playwright-core) which: checks the extension registered; adds a Learn Sparsity Mask
node and finds the chart widget (not saved, not sent with the prompt); feeds it synthetic and then real
``ecodiff.learn`` events from a tiny learn -> prune -> compare run queued from the page; opens the
slider compare view of the Compare node; loads every example workflow and saves it back unchanged.
Screenshots are written to a temporary folder (printed with -s).

Needs COMFYUI_PATH, ComfyUI's frontend package (comfyui-frontend-package), Node.js, Chromium
(``apt-get install chromium`` or CHROMIUM_PATH) and playwright-core resolvable by Node (``npm i
playwright-core`` in a folder outside the repository, then NODE_PATH=<that folder>/node_modules);
skipped with the reason otherwise.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import comfy_server
import pytest

from scripts import workflow_schema as ws
from scripts.comfy_env import SKIP_REASON, comfy_path

SCRIPT = Path(__file__).resolve().parent / "ui_check.cjs"
EXTENSION_URL = "/extensions/ComfyUI-EcoDiff/"


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


@pytest.fixture(scope="module")
def ui_results(tmp_path_factory):
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfy_browser")
    shots = tmp_path_factory.mktemp("screenshots")
    with comfy_server.ComfyServer(base) as server:
        graph = comfy_server.learn_prune_compare_graph("sdxl", run_name="browser")
        config = {
            "url": server.url, "chromium": chromium_path(), "out_dir": str(shots), "timeout_ms": 180_000,
            "api_prompt": graph, "learn_id": "4", "compare_id": "11", "expected_steps": 4,
            "workflows": {p.stem: ws.load(p) for p in ws.example_paths()},
        }
        config_path = base / "ui_check_config.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        try:
            proc = subprocess.run(["node", str(SCRIPT), str(config_path)], capture_output=True, text=True,
                                  timeout=540, cwd=SCRIPT.parent, check=False)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"ui_check.cjs did not finish in {exc.timeout} s\n{server.log_tail()}")
        object_info = server.object_info()
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
    return results


def ours(messages: list[str]) -> list[str]:
    return [m for m in messages if "ecodiff" in m.lower() and not m.startswith(("log:", "debug:", "info:"))]


def test_extension_is_registered_without_errors(ui_results):
    ext = ui_results["steps"]["extension"]
    assert ext["registered"], f"EcoDiff.UI not in app.extensions; custom extensions: {ext['all']}"
    assert ext["version"]
    assert any("[EcoDiff] web extension" in m for m in ui_results["console"]), "no console marker"
    assert not ours(ui_results["pageErrors"]), ours(ui_results["pageErrors"])
    assert not [m for m in ours(ui_results["console"]) if m.startswith("error")], ours(ui_results["console"])


def test_learn_node_gets_a_chart_that_is_neither_saved_nor_sent(ui_results):
    learn = ui_results["steps"]["learnNode"]
    assert learn["chart"] and learn["chartIsLast"] and learn["chartHeight"] >= 100, learn
    slots = ws.widget_slots(ui_results["_object_info"]["EcoDiffLearnMask"])
    assert learn["savedValues"] == len(slots), "the chart must not add a widgets_values entry"
    assert learn["sentInputs"] is not None and "ecodiff_chart" not in learn["sentInputs"]
    assert learn["fits"], "the node is tall enough for its widgets and the chart"
    assert (ui_results["_shots"] / "learn_node_empty.png").is_file()


def test_chart_follows_learn_events(ui_results):
    synthetic = ui_results["steps"]["synthetic"]
    assert synthetic == {"points": 12, "total": 12, "done": True}, synthetic
    run = ui_results["steps"]["tinyRun"]
    assert "error" not in (run["waited"] or {}), run["waited"]
    state = run["learnState"]
    assert state and state["points"] == 4 and state["total"] == 4, state
    assert math.isfinite(state["last"]["loss"]) and state["last"]["sparsity"], state
    assert (ui_results["_shots"] / "tiny_run.png").is_file()


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
    assert not r["promptHasChart"]
    assert r["fit"] == [], r["fit"]
    assert not ours(r["pageErrors"]), r["pageErrors"]
    assert (ui_results["_shots"] / f"workflow_{name}.png").is_file()
