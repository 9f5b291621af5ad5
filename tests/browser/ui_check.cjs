// Headless-Chromium check of the EcoDiff web extension against a running ComfyUI (tests/browser).
//
//   node ui_check.cjs CONFIG.json   (playwright-core must be resolvable: NODE_PATH=<dir>/node_modules)
//
// CONFIG: {url, chromium, out_dir, api_prompt, learn_id, compare_id, report_id, text_ids, expected_steps,
//          workflows: {name: json}, timeout_ms}
// Prints one JSON object (the results) on stdout; screenshots go to out_dir.  Every wait is bounded.
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const TIMEOUT = cfg.timeout_ms || 120000;
const results = { console: [], pageErrors: [], steps: {} };

/** Put graph node ``id`` at the top left of the window at ``scale`` (DOM widgets show from scale 0.6). */
async function focusNode(page, id, scale = 1) {
  await page.evaluate(({ id, scale }) => {
    const c = window.app.canvas, n = window.app.graph.getNodeById(Number(id));
    c.ds.scale = scale;
    c.ds.offset = [60 / scale - n.pos[0], 90 / scale - n.pos[1]];
    window.app.graph.setDirtyCanvas(true, true);
  }, { id, scale });
  await page.waitForTimeout(400);
}

/** Window rectangle of graph node ``id`` (title bar included), for clipped screenshots. */
async function nodeClip(page, id, pad = 12) {
  return page.evaluate(({ id, pad }) => {
    const c = window.app.canvas, n = window.app.graph.getNodeById(Number(id));
    const r = c.canvas.getBoundingClientRect(), s = c.ds.scale, [ox, oy] = c.ds.offset;
    const b = n.getBounding();
    const x = Math.max(0, r.left + (b[0] + ox) * s - pad), y = Math.max(0, r.top + (b[1] + oy) * s - pad);
    return { x, y, width: Math.min(innerWidth - x, b[2] * s + 2 * pad), height: Math.min(innerHeight - y, b[3] * s + 2 * pad) };
  }, { id, pad });
}

/** Press button ``name`` of graph node ``id`` (slider compare, open report): the overlay it opens, its
 *  images (``selector``) once loaded, the compare frame's split and the report's table. */
async function pressViewButton(page, id, name, selector) {
  return page.evaluate(async ({ id, name, selector }) => {
    const n = window.app.graph.getNodeById(Number(id));
    const button = n && n.widgets.find((w) => w.name === name);
    if (!button) return { button: false };
    button.callback && button.callback(button, window.app.canvas, n);
    const el = document.getElementById("ecodiff-compare-overlay");
    const imgs = el ? [...el.querySelectorAll(selector)] : [];
    await Promise.all(imgs.map((img) => img.complete ? null : new Promise((r) => { img.onload = img.onerror = r; })));
    const frame = el && el.querySelector(".ecodiff-compare-frame");
    const table = el && el.querySelector(".ecodiff-report-table");
    return { button: true, overlay: !!el, split: frame ? frame.dataset.split : null,
             table: table ? table.textContent : null,
             imgs: imgs.map((i) => ({ natural: [i.naturalWidth, i.naturalHeight], shown: [i.width, i.height] })) };
  }, { id, name, selector });
}

/** The result box of graph node ``id``: its value, and whether the user sees it (on screen, not covered). */
async function resultBox(page, id) {
  return page.evaluate((id) => {
    const n = window.app.graph.getNodeById(Number(id));
    const w = n && n.widgets.find((x) => x.name === "ecodiff_result");
    if (!w) return { widget: false };
    const el = w.element || w.inputEl;
    const r = el ? el.getBoundingClientRect() : null;
    const hit = r && r.width > 0 ? document.elementFromPoint(r.left + r.width / 2, r.top + Math.min(10, r.height / 2)) : null;
    return { widget: true, value: w.value, domValue: el && el.value, readOnly: !!(el && el.readOnly),
             visible: !!(r && r.width > 20 && r.height > 20 && getComputedStyle(el).visibility !== "hidden" && hit === el),
             serialize: w.serialize, sentWithPrompt: !(w.options && w.options.serialize === false) };
  }, id);
}

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
      const seed = node.widgets.find((w) => w.name === "seed");
      const seedControl = seed && seed.linkedWidgets && seed.linkedWidgets[0];
      const sampler = LiteGraph.createNode("KSampler"); // the frontend's default, for contrast
      sampler.pos = [700, 80];
      app.graph.add(sampler);
      const samplerSeed = sampler.widgets.find((w) => w.name === "seed");
      const saved = node.serialize();
      // a saved workflow keeps its own choice: a Learn node saved with "randomize" loads with it
      const controlIndex = node.widgets.filter((w) => w.serialize !== false).indexOf(seedControl);
      const copy = structuredClone(saved);
      copy.widgets_values[controlIndex] = "randomize";
      const reloaded = LiteGraph.createNode("EcoDiffLearnMask");
      reloaded.configure(copy);
      const reloadedControl = reloaded.widgets.find((w) => w.name === "seed").linkedWidgets[0].value;
      app.graph.remove(sampler);
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
        seedControl: seedControl ? seedControl.value : null, savedControl: saved.widgets_values[controlIndex],
        samplerControl: samplerSeed && samplerSeed.linkedWidgets ? samplerSeed.linkedWidgets[0].value : null,
        reloadedControl, resultBox: node.widgets.some((w) => w.name === "ecodiff_result"),
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

    // 4. a real run (the demo workflow, shortened): progress events draw the chart, the text results show in
    //    their nodes, Compare offers the slider view and the Pruning Report its full-size view
    if (cfg.api_prompt) {
      await page.evaluate((p) => window.app.loadApiJson(p, "ecodiff_run"), cfg.api_prompt);
      await page.waitForTimeout(500);
      await page.evaluate(() => {
        window.comfyAPI.api.api.addEventListener("execution_error", (e) => { window.__ecodiffRunError = e.detail; });
        return window.app.queuePrompt(0, 1);
      });
      const handle = await page.waitForFunction(({ learnId, compareId, textIds, steps }) => {
        const g = window.app.graph;
        const learn = g.getNodeById(Number(learnId)), cmp = g.getNodeById(Number(compareId));
        const pts = learn && learn.__ecodiffChart ? learn.__ecodiffChart.points.length : 0;
        const failed = window.__ecodiffRunError;
        if (failed) return { error: `${failed.node_type} #${failed.node_id}: ${failed.exception_message}` };
        const texts = textIds.filter((id) => {
          const w = g.getNodeById(Number(id)).widgets.find((x) => x.name === "ecodiff_result");
          return w && w.value;
        }).length;
        return pts >= steps && cmp && cmp.__ecodiffImages && texts === textIds.length ? { pts, texts } : false;
      }, { learnId: cfg.learn_id, compareId: cfg.compare_id, textIds: cfg.text_ids, steps: cfg.expected_steps },
      { timeout: TIMEOUT, polling: 250 }).catch((e) => ({ error: String(e) }));
      const waited = handle.jsonValue ? await handle.jsonValue() : handle;
      const canvas = await page.evaluate(() => {
        const c = window.app.canvas;
        c.ds.scale = 0.45;
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
      // the text results, each seen at 100 % zoom (DOM widgets hide when zoomed far out)
      const texts = {};
      for (const id of cfg.text_ids) {
        await focusNode(page, id);
        texts[id] = await resultBox(page, id);
        await page.screenshot({ path: path.join(cfg.out_dir, `result_${id}.png`), clip: await nodeClip(page, id) });
      }
      await focusNode(page, cfg.learn_id);
      await page.screenshot({ path: path.join(cfg.out_dir, "live_chart.png"), clip: await nodeClip(page, cfg.learn_id) });
      const overlay = await pressViewButton(page, cfg.compare_id, "slider compare", "img");
      if (overlay.imgs) {
        overlay.images = overlay.imgs.length;
        overlay.loaded = overlay.imgs.filter((i) => i.natural[0] > 0).length;
      }
      if (overlay.overlay) {
        const frame = await page.$(".ecodiff-compare-frame");
        await page.waitForTimeout(300);
        const box = frame && await frame.boundingBox();
        if (box) await page.mouse.move(box.x + box.width * 0.3, box.y + box.height / 2);
        overlay.splitAfterMove = await page.evaluate(() => {
          const f = document.querySelector(".ecodiff-compare-frame");
          return f && f.dataset.split;
        });
        await page.screenshot({ path: path.join(cfg.out_dir, "compare_overlay.png") });
        if (box) {
          await page.screenshot({ path: path.join(cfg.out_dir, "compare_view.png"),
                                  clip: { x: box.x - 20, y: Math.max(0, box.y - 50), width: box.width + 40, height: box.height + 70 } });
        }
        await page.keyboard.press("Escape");
        overlay.closed = await page.evaluate(() => !document.getElementById("ecodiff-compare-overlay"));
      }
      const report = await pressViewButton(page, cfg.report_id, "open report", "img.ecodiff-report-chart");
      report.charts = report.imgs;
      if (report.overlay) {
        await page.waitForTimeout(300);
        await page.screenshot({ path: path.join(cfg.out_dir, "report_view.png") });
        const body = await page.$(".ecodiff-report-body");
        const box = body && await body.boundingBox();
        if (box) {
          await page.screenshot({ path: path.join(cfg.out_dir, "report_view_clip.png"),
                                  clip: { x: Math.max(0, box.x - 10), y: Math.max(0, box.y - 40), width: box.width + 20, height: box.height + 50 } });
        }
        await page.keyboard.press("Escape");
        report.closed = await page.evaluate(() => !document.getElementById("ecodiff-compare-overlay"));
      }
      results.steps.tinyRun = { waited, canvas, learnState, texts, overlay, report };
    }

    // 5. every example workflow loads in the real frontend and saves back the same widget values and links
    results.steps.workflows = {};
    for (const [name, wf] of Object.entries(cfg.workflows || {})) {
      const errorsBefore = results.pageErrors.length;
      // the server has no models: the frontend lists the workflow's missing models with their download
      await page.evaluate(async (wf) => {
        await window.app.loadGraphData(structuredClone(wf), true, true, null,
                                       { showMissingNodesDialog: false, showMissingModelsDialog: true });
      }, wf);
      const dialog = await page.waitForSelector(".comfy-missing-models", { timeout: 10000 })
        .then((el) => el.evaluate((e) => ({
          text: e.innerText,
          errors: [...e.querySelectorAll(".p-message")].map((m) => m.innerText),
          downloads: [...e.querySelectorAll("button")].filter((b) => !b.disabled && (b.title || "").startsWith("https://"))
            .map((b) => b.title),
        })))
        .catch(() => null);
      if (dialog) {
        await page.screenshot({ path: path.join(cfg.out_dir, `missing_models_${name}.png`) });
        await page.keyboard.press("Escape");
        await page.waitForSelector(".comfy-missing-models", { state: "detached", timeout: 5000 }).catch(() => null);
      }
      const r = await page.evaluate(async (wf) => {
        const { app, LiteGraph } = window;
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
          promptHasResult: Object.values(prompt.output).some((p) => "ecodiff_result" in p.inputs),
          // the file's layout is what the user sees: no node grew on load, none overlaps another
          grown: wf.nodes.map((n) => [n, app.graph.getNodeById(n.id)])
            .filter(([n, g]) => g && (g.size[0] > n.size[0] + 1 || g.size[1] > n.size[1] + 1))
            .map(([n, g]) => `${n.type} #${n.id}: file ${n.size} -> frontend ${[...g.size].map(Math.round)}`),
          overlaps: (() => {
            const out = [], nodes = app.graph.nodes;
            for (let i = 0; i < nodes.length; i++) {
              for (let j = i + 1; j < nodes.length; j++) {
                const a = nodes[i].getBounding(), b = nodes[j].getBounding();
                const dx = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
                const dy = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
                if (dx > 0 && dy > 0) out.push(`${nodes[i].type} #${nodes[i].id} / ${nodes[j].type} #${nodes[j].id}`);
              }
            }
            return out;
          })(),
          models: Object.fromEntries(app.graph.nodes.filter((n) => n.properties && n.properties.models)
            .map((n) => [n.id, n.properties.models.map((m) => `${m.directory} / ${m.name}`)])),
        };
      }, wf);
      r.dialog = dialog;
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
