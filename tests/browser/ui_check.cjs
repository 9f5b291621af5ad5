// Headless-Chromium check of the EcoDiff web extension against a running ComfyUI (tests/browser).
//
//   node ui_check.cjs CONFIG.json   (playwright-core must be resolvable: NODE_PATH=<dir>/node_modules)
//
// CONFIG: {url, chromium, out_dir, api_prompt, learn_id, compare_id, expected_steps, workflows: {name: json},
//          timeout_ms}
// Prints one JSON object (the results) on stdout; screenshots go to out_dir.  Every wait is bounded.
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const TIMEOUT = cfg.timeout_ms || 120000;
const results = { console: [], pageErrors: [], steps: {} };

async function main() {
  const browser = await chromium.launch({
    executablePath: cfg.chromium,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1920, height: 1200 } });
    page.setDefaultTimeout(TIMEOUT);
    page.on("console", (m) => results.console.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => results.pageErrors.push(String((e && (e.stack || e.message)) || e)));
    // no "Get started with a template" dialog over the canvas (a first-start dialog of the frontend)
    await fetch(`${cfg.url}/api/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" })
      .catch((e) => results.console.push(`warning: could not set Comfy.TutorialCompleted: ${e}`));
    await page.goto(cfg.url, { timeout: TIMEOUT });
    await page.waitForFunction(() => {
      const t = window.LiteGraph && window.LiteGraph.registered_node_types;
      return window.app && window.app.graph && t && t.KSampler && t.EcoDiffLearnMask && t.EcoDiffCompare;
    }, null, { timeout: TIMEOUT });
    await page.keyboard.press("Escape"); // the templates dialog on first start
    await page.waitForTimeout(500);

    // 1. the extension is registered
    results.steps.extension = await page.evaluate(() => {
      const ext = window.app.extensions.find((e) => e.name === "EcoDiff.UI");
      return { registered: !!ext, version: ext && ext.ecodiff && ext.ecodiff.version,
               all: window.app.extensions.map((e) => e.name).filter((n) => !n.startsWith("Comfy.")) };
    });

    // 2. a Learn node added to an empty graph has the chart widget, which is neither saved nor sent
    results.steps.learnNode = await page.evaluate(async () => {
      const { app, LiteGraph } = window;
      app.graph.clear();
      const node = LiteGraph.createNode("EcoDiffLearnMask");
      node.pos = [120, 80];
      app.graph.add(node);
      const chart = node.widgets.find((w) => w.name === "ecodiff_chart");
      const saved = node.serialize();
      const prompt = await app.graphToPrompt();
      const sent = prompt.output[String(node.id)];
      app.canvas.ds.offset = [0, 60];
      app.canvas.ds.scale = 1;
      app.graph.setDirtyCanvas(true, true);
      return {
        id: node.id, chart: !!chart, chartIsLast: node.widgets[node.widgets.length - 1] === chart,
        chartHeight: chart ? chart.computeSize(400)[1] : null,
        widgetNames: node.widgets.map((w) => w.name), savedValues: saved.widgets_values.length,
        sentInputs: sent ? Object.keys(sent.inputs) : null,
        fits: node.size[1] >= node.computeSize()[1] - 1,
      };
    });
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(cfg.out_dir, "learn_node_empty.png") });

    // 3. synthetic "ecodiff.learn" events (what the Learn node sends) reach the chart
    results.steps.synthetic = await page.evaluate(async (id) => {
      const api = window.comfyAPI.api.api;
      for (let s = 1; s <= 12; s++) {
        api.dispatchEvent(new CustomEvent("ecodiff.learn", { detail: {
          node: String(id), step: s, total: 12, loss: 0.5 * Math.exp(-s / 4) + 0.01, recon: 0.4, reg: 0.1,
          sparsity: { head: Math.min(0.6, s / 20), neuron: Math.min(0.5, s / 25) } } }));
      }
      await new Promise((r) => setTimeout(r, 200));
      const node = window.app.graph.getNodeById(id);
      const st = node.__ecodiffChart;
      return { points: st ? st.points.length : 0, total: st && st.total, done: st && st.done };
    }, results.steps.learnNode.id);
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(cfg.out_dir, "learn_chart_synthetic.png") });

    // 4. a real run on tiny models: progress events draw the chart, Compare offers the slider view
    if (cfg.api_prompt) {
      await page.evaluate((p) => window.app.loadApiJson(p, "ecodiff_tiny"), cfg.api_prompt);
      await page.waitForTimeout(500);
      await page.evaluate(() => {
        window.comfyAPI.api.api.addEventListener("execution_error", (e) => { window.__ecodiffRunError = e.detail; });
        return window.app.queuePrompt(0, 1);
      });
      const handle = await page.waitForFunction(({ learnId, compareId, steps }) => {
        const g = window.app.graph;
        const learn = g.getNodeById(Number(learnId)), cmp = g.getNodeById(Number(compareId));
        const pts = learn && learn.__ecodiffChart ? learn.__ecodiffChart.points.length : 0;
        const failed = window.__ecodiffRunError;
        if (failed) return { error: `${failed.node_type} #${failed.node_id}: ${failed.exception_message}` };
        return pts >= steps && cmp && cmp.__ecodiffImages ? { pts } : false;
      }, { learnId: cfg.learn_id, compareId: cfg.compare_id, steps: cfg.expected_steps },
      { timeout: TIMEOUT, polling: 250 }).catch((e) => ({ error: String(e) }));
      const waited = handle.jsonValue ? await handle.jsonValue() : handle;
      const canvas = await page.evaluate(() => {
        const c = window.app.canvas;
        c.ds.scale = 0.62;
        c.ds.offset = [30, 110];
        window.app.graph.setDirtyCanvas(true, true);
        return true;
      });
      await page.waitForTimeout(500);
      await page.screenshot({ path: path.join(cfg.out_dir, "tiny_run.png") });
      const learnState = await page.evaluate((id) => {
        const n = window.app.graph.getNodeById(Number(id));
        const st = n && n.__ecodiffChart;
        return st ? { points: st.points.length, total: st.total, last: st.points[st.points.length - 1] } : null;
      }, cfg.learn_id);
      const overlay = await page.evaluate(async (id) => {
        const n = window.app.graph.getNodeById(Number(id));
        const button = n && n.widgets.find((w) => w.name === "slider compare");
        if (!button) return { button: false };
        button.callback && button.callback(button, window.app.canvas, n);
        const el = document.getElementById("ecodiff-compare-overlay");
        const imgs = el ? [...el.querySelectorAll("img")] : [];
        await Promise.all(imgs.map((img) => img.complete ? null : new Promise((r) => { img.onload = img.onerror = r; })));
        return { button: true, overlay: !!el, images: imgs.length,
                 loaded: imgs.filter((i) => i.naturalWidth > 0).length,
                 split: el && el.querySelector(".ecodiff-compare-frame")
                   ? el.querySelector(".ecodiff-compare-frame").dataset.split : null };
      }, cfg.compare_id);
      if (overlay.overlay) {
        const frame = await page.$(".ecodiff-compare-frame");
        const box = frame && await frame.boundingBox();
        if (box) await page.mouse.move(box.x + box.width * 0.3, box.y + box.height / 2);
        overlay.splitAfterMove = await page.evaluate(() => {
          const f = document.querySelector(".ecodiff-compare-frame");
          return f && f.dataset.split;
        });
        await page.screenshot({ path: path.join(cfg.out_dir, "compare_overlay.png") });
        await page.keyboard.press("Escape");
        overlay.closed = await page.evaluate(() => !document.getElementById("ecodiff-compare-overlay"));
      }
      results.steps.tinyRun = { waited, canvas, learnState, overlay };
    }

    // 5. every example workflow loads in the real frontend and saves back the same widget values and links
    results.steps.workflows = {};
    for (const [name, wf] of Object.entries(cfg.workflows || {})) {
      const errorsBefore = results.pageErrors.length;
      const r = await page.evaluate(async (wf) => {
        const { app, LiteGraph } = window;
        await app.loadGraphData(structuredClone(wf), true, true, null,
                                { showMissingNodesDialog: false, showMissingModelsDialog: false });
        const saved = app.graph.serialize();
        const byId = Object.fromEntries(saved.nodes.map((n) => [n.id, n]));
        const missing = wf.nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type);
        const valueDiffs = [];
        for (const n of wf.nodes) {
          const got = byId[n.id];
          if (!got) { valueDiffs.push(`node ${n.id} missing after load`); continue; }
          const a = JSON.stringify(n.widgets_values ?? null), b = JSON.stringify(got.widgets_values ?? null);
          if (a !== b) valueDiffs.push(`${n.type} #${n.id}: file ${a.slice(0, 200)} vs frontend ${b.slice(0, 200)}`);
          const ins = (n.inputs || []).map((i) => `${i.name}:${i.link}`).join(",");
          const gins = (got.inputs || []).map((i) => `${i.name}:${i.link}`).join(",");
          if (ins !== gins) valueDiffs.push(`${n.type} #${n.id}: inputs ${ins} vs ${gins}`);
        }
        const links = JSON.stringify([...wf.links].sort((x, y) => x[0] - y[0]));
        const glinks = JSON.stringify([...saved.links].sort((x, y) => x[0] - y[0]));
        const learners = app.graph.nodes.filter((n) => n.comfyClass === "EcoDiffLearnMask");
        const prompt = await app.graphToPrompt();
        app.canvas.ds.scale = 0.62;
        app.canvas.ds.offset = [40, 110];
        app.graph.setDirtyCanvas(true, true);
        return {
          missing, valueDiffs, linksEqual: links === glinks, nodes: app.graph.nodes.length,
          charts: learners.filter((n) => n.widgets.some((w) => w.name === "ecodiff_chart")).length,
          learners: learners.length,
          fit: app.graph.nodes.filter((n) => n.comfyClass && n.size[1] < n.computeSize()[1] - 1)
            .map((n) => `${n.comfyClass} #${n.id} ${n.size[1]} < ${n.computeSize()[1]}`),
          promptNodes: Object.keys(prompt.output).length,
          promptHasChart: Object.values(prompt.output).some((p) => "ecodiff_chart" in p.inputs),
        };
      }, wf);
      r.pageErrors = results.pageErrors.slice(errorsBefore);
      await page.waitForTimeout(300);
      await page.screenshot({ path: path.join(cfg.out_dir, `workflow_${name}.png`) });
      results.steps.workflows[name] = r;
    }
  } finally {
    await browser.close();
  }
}

main().then(
  () => { process.stdout.write(JSON.stringify(results)); },
  (e) => { results.fatal = String(e && e.stack || e); process.stdout.write(JSON.stringify(results)); process.exitCode = 1; },
);
