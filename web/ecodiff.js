// EcoDiff UI extension for ComfyUI's frontend (plain ES module, no build step).
//
// * Learn Sparsity Mask (EcoDiffLearnMask): a small chart drawn in the node that follows the loss and
//   the sparsity per unit kind while the mask is learned.  Data comes from the websocket event
//   "ecodiff.learn" that the node sends after every optimiser step:
//     {node, step, total, loss, recon, reg, sparsity: {head: 0.12, neuron: 0.3, ...}}
//   EcoDiff LoRA Recover (EcoDiffLoraRecover) sends the same event with its distillation loss and
//   an empty sparsity, and gets the same chart.
// * Compare Images (EcoDiffCompare): a "slider compare" button that opens an overlay with the A and B
//   images on top of each other and a draggable divider (the stitched side-by-side image stays in the
//   node, drawn by ComfyUI itself from the node's ui "images").
// * Text results (the node's ui "text": Learn's summary, the Save nodes' "saved … to …", the Pruning
//   Report's table with its warnings, LoRA Recover's summary, the judge's scores): shown in a read-only
//   multiline widget "ecodiff_result" (ComfyUI's own STRING widget, as its Preview Any node does; neither
//   saved in the workflow nor sent with the prompt).  The Pruning Report also gets an "open report"
//   button: an overlay with the chart at its real size beside the table.
// * Seeds: the frontend gives every seed a "control after generate" set to randomize; on EcoDiff nodes
//   a new node starts with "fixed" (a new seed means learning again).  Loaded workflows keep their value.
//
// Served by ComfyUI from WEB_DIRECTORY ("./web") as /extensions/<pack folder>/ecodiff.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EXTENSION = "EcoDiff.UI";
const VERSION = "0.1.0";
const LEARN_NODE = "EcoDiffLearnMask";
const RECOVER_NODE = "EcoDiffLoraRecover"; // sends the same event (loss only, no sparsity)
const CHART_NODES = new Set([LEARN_NODE, RECOVER_NODE]);
const COMPARE_NODE = "EcoDiffCompare";
const LEARN_EVENT = "ecodiff.learn";
const CHART_WIDGET = "ecodiff_chart";
const COMPARE_BUTTON = "slider compare";
const REPORT_NODE = "EcoDiffPruningReport";
const REPORT_BUTTON = "open report";
const TEXT_WIDGET = "ecodiff_result";
const TEXT_MIN_HEIGHT = 76;
/** nodes whose ui "text" is their result: they get the text widget as soon as they are created */
const TEXT_NODES = new Set([LEARN_NODE, RECOVER_NODE, REPORT_NODE, "EcoDiffSaveMask", "EcoDiffLoadMask",
                            "EcoDiffSavePrunedModel", "EcoDiffJudgeDigits"]);
const CONTROL_VALUES = ["fixed", "increment", "decrement", "randomize"];
const IS_CONTROL = window.comfyAPI?.widgets?.IS_CONTROL_WIDGET ?? Symbol("none"); // marks control widgets
const CHART_HEIGHT = 150;
const MAX_POINTS = 4000;
const KIND_COLORS = { head: "#ffb74d", neuron: "#81c784", channel: "#ba68c8" };
const LOSS_COLOR = "#4fc3f7";

// --------------------------------------------------------------------------------------------
// graph helpers
// --------------------------------------------------------------------------------------------
function rootGraph() {
  return app.rootGraph ?? app.graph;
}

/** The node for an execution id: "12", or "5:12" for a node inside subgraph node 5. */
function resolveNode(id) {
  let graph = rootGraph();
  if (id == null || !graph) return null;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph?.getNodeById) return null;
    node = graph.getNodeById(Number.isNaN(Number(part)) ? part : Number(part));
    if (!node) return null;
    graph = node.subgraph ?? null;
  }
  return node;
}

function nodeClass(node) {
  return node?.comfyClass ?? node?.type;
}

function redraw(node) {
  node?.setDirtyCanvas?.(true, true);
  app.canvas?.setDirty?.(true, true);
}

function isEcoDiff(node) {
  return String(nodeClass(node) ?? "").startsWith("EcoDiff");
}

function fitHeight(node) {
  const needed = node.computeSize?.();
  if (needed && node.size && node.size[1] < needed[1]) node.setSize([Math.max(node.size[0], needed[0]), needed[1]]);
}

// --------------------------------------------------------------------------------------------
// learning chart
// --------------------------------------------------------------------------------------------
function chartState(node) {
  node.__ecodiffChart ??= { points: [], total: 0, done: false };
  return node.__ecodiffChart;
}

function addChart(node) {
  if (node.widgets?.some((w) => w.name === CHART_WIDGET)) return;
  const state = chartState(node);
  const widget = {
    name: CHART_WIDGET,
    type: "ecodiff.chart",
    value: "",
    serialize: false, // not saved in the workflow
    options: { serialize: false }, // not sent with the prompt
    computeSize(width) {
      return [width ?? 300, CHART_HEIGHT];
    },
    draw(ctx, _node, width, y) {
      drawChart(ctx, state, 10, y + 4, Math.max(60, width - 20), CHART_HEIGHT - 8);
    },
  };
  node.addCustomWidget(widget);
  fitHeight(node);
}

/** Record one "ecodiff.learn" event; returns the node it went to (or null). */
function onLearnEvent(detail) {
  if (!detail || typeof detail !== "object") return null;
  let node = resolveNode(detail.node);
  if (!node || !CHART_NODES.has(nodeClass(node))) {
    const learners = (rootGraph()?.nodes ?? []).filter((n) => CHART_NODES.has(nodeClass(n)));
    node = learners.length === 1 ? learners[0] : null; // unknown id: only a lone Learn node is a safe guess
  }
  if (!node) return null;
  addChart(node);
  const state = chartState(node);
  const step = Number(detail.step);
  const last = state.points[state.points.length - 1];
  if (last && !(step > last.step)) state.points = []; // a new run (or a restart from step 1)
  state.points.push({
    step,
    loss: Number(detail.loss),
    recon: Number(detail.recon),
    reg: Number(detail.reg),
    sparsity: detail.sparsity && typeof detail.sparsity === "object" ? { ...detail.sparsity } : {},
  });
  if (state.points.length > MAX_POINTS) state.points = state.points.filter((_, i) => i % 2 === 0);
  state.total = Number(detail.total) || state.total;
  state.done = state.total > 0 && step >= state.total;
  redraw(node);
  return node;
}

function fmt(x) {
  if (!Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toPrecision(3);
}

function drawChart(ctx, state, x, y, w, h) {
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, 6);
  else ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.stroke();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  const pts = state.points;
  if (!pts.length) {
    ctx.fillStyle = "#888";
    ctx.textAlign = "center";
    ctx.fillText("EcoDiff: loss and sparsity appear here while learning", x + w / 2, y + h / 2 - 6);
    ctx.restore();
    return;
  }
  const last = pts[pts.length - 1];
  const kinds = [...new Set(pts.flatMap((p) => Object.keys(p.sparsity)))];
  // header
  ctx.textAlign = "left";
  ctx.fillStyle = "#ddd";
  const header = `step ${last.step}${state.total ? "/" + state.total : ""}  loss ${fmt(last.loss)}` +
    (state.done ? "  (done)" : "");
  ctx.fillText(header, x + 6, y + 4);
  let lx = x + 6;
  const legendY = y + 18;
  ctx.fillStyle = LOSS_COLOR;
  ctx.fillText("loss", lx, legendY);
  lx += ctx.measureText("loss").width + 10;
  for (const kind of kinds) {
    const text = `${kind} ${Math.round(100 * (Number(last.sparsity[kind]) || 0))}%`;
    ctx.fillStyle = KIND_COLORS[kind] ?? "#e0e0e0";
    ctx.fillText(text, lx, legendY);
    lx += ctx.measureText(text).width + 10;
  }
  // plot area
  const px = x + 6, py = y + 34, pw = w - 12, ph = h - 40;
  ctx.strokeStyle = "#333";
  ctx.beginPath();
  for (let i = 0; i <= 4; i++) {
    const gy = py + (ph * i) / 4;
    ctx.moveTo(px, gy);
    ctx.lineTo(px + pw, gy);
  }
  ctx.stroke();
  const first = pts[0].step;
  const span = Math.max(1, Math.max(state.total || 0, last.step) - first);
  const sx = (s) => px + (pw * (s - first)) / span;
  // loss: log scale when it spans more than a decade
  const losses = pts.map((p) => p.loss).filter((v) => Number.isFinite(v));
  if (losses.length) {
    const positive = losses.every((v) => v > 0);
    let lo = Math.min(...losses), hi = Math.max(...losses);
    const useLog = positive && hi / lo > 10;
    const tf = (v) => (useLog ? Math.log10(v) : v);
    let tlo = tf(lo), thi = tf(hi);
    if (thi - tlo < 1e-12) { thi += 0.5; tlo -= 0.5; }
    const sy = (v) => py + ph - (ph * (tf(v) - tlo)) / (thi - tlo);
    plotLine(ctx, pts.filter((p) => Number.isFinite(p.loss)).map((p) => [sx(p.step), sy(p.loss)]), LOSS_COLOR, 2);
    ctx.fillStyle = "#777";
    ctx.textAlign = "right";
    ctx.fillText(fmt(hi) + (useLog ? " (log)" : ""), px + pw - 2, py + 1);
    ctx.textBaseline = "bottom";
    ctx.fillText(fmt(lo), px + pw - 2, py + ph - 1);
    ctx.textBaseline = "top";
  }
  // sparsity per kind on a fixed 0..100 % axis
  for (const kind of kinds) {
    const line = pts.filter((p) => Number.isFinite(Number(p.sparsity[kind])))
      .map((p) => [sx(p.step), py + ph - ph * Math.min(1, Math.max(0, Number(p.sparsity[kind])))]);
    plotLine(ctx, line, KIND_COLORS[kind] ?? "#e0e0e0", 1.5);
  }
  ctx.restore();
}

function plotLine(ctx, xy, color, width) {
  if (!xy.length) return;
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.beginPath();
  xy.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  if (xy.length === 1) ctx.lineTo(xy[0][0] + 1, xy[0][1]);
  ctx.stroke();
}

// --------------------------------------------------------------------------------------------
// text results and seeds
// --------------------------------------------------------------------------------------------
function addTextWidget(node) {
  const existing = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (existing) return existing;
  const widget = ComfyWidgets.STRING(node, TEXT_WIDGET, ["STRING", {
    multiline: true, placeholder: "EcoDiff: the result of this node appears here after a run",
  }], app).widget;
  widget.serialize = false; // not saved in the workflow
  widget.options ??= {};
  widget.options.serialize = false; // not sent with the prompt
  widget.options.read_only = true;
  widget.options.getMinHeight ??= () => TEXT_MIN_HEIGHT; // five lines (the frontend's default is 50 px)
  const el = widget.element ?? widget.inputEl;
  if (el) {
    el.readOnly = true;
    el.classList?.add("ecodiff-result");
    // the report's table keeps its columns (scrolls sideways); other results wrap
    const table = nodeClass(node) === REPORT_NODE;
    Object.assign(el.style, { fontFamily: "monospace", fontSize: "11px", whiteSpace: table ? "pre" : "pre-wrap",
                              overflowWrap: table ? "normal" : "anywhere" });
  }
  fitHeight(node);
  return widget;
}

/** A node's ui "text" (a list of strings, one per output batch) as one string. */
function resultText(text) {
  return (Array.isArray(text) ? text : [text]).filter((t) => t != null).map(String).join("\n\n");
}

function showText(node, text) {
  const value = resultText(text);
  const widget = addTextWidget(node);
  widget.value = value;
  const el = widget.element ?? widget.inputEl;
  if (el && el.value !== value) el.value = value;
  fitHeight(node);
  redraw(node);
  return widget;
}

/** New EcoDiff nodes: every "control after generate" of a seed starts at "fixed". */
function fixSeedControls(node) {
  const linked = new Set((node.widgets ?? []).flatMap((w) => w.linkedWidgets ?? []));
  for (const w of node.widgets ?? []) {
    const values = w.options?.values;
    const isControl = w[IS_CONTROL] || (linked.has(w) && Array.isArray(values) && values.includes("randomize"));
    if (isControl && CONTROL_VALUES.includes(w.value)) w.value = "fixed";
  }
}

// --------------------------------------------------------------------------------------------
// slider compare
// --------------------------------------------------------------------------------------------
function viewUrl(image) {
  const params = new URLSearchParams({
    filename: image.filename,
    type: image.type ?? "output",
    subfolder: image.subfolder ?? "",
  });
  return api.apiURL(`/view?${params}${app.getRandParam?.() ?? ""}`);
}

function widgetValue(node, name, fallback) {
  const w = node.widgets?.find((x) => x.name === name);
  return w?.value ?? fallback;
}

function addButton(node, name, callback) {
  if (node.widgets?.some((w) => w.name === name)) return;
  const button = node.addWidget("button", name, null, callback, { serialize: false });
  button.serialize = false;
  fitHeight(node);
}

function addCompareButton(node) {
  addButton(node, COMPARE_BUTTON, () => openCompare(node));
}

const OVERLAY_ID = "ecodiff-compare-overlay";

function closeCompare() {
  document.getElementById(OVERLAY_ID)?.remove();
}

/** A full-window overlay (closed by Esc or a click beside its content); ``onKey`` gets other keys. */
function openOverlay(className, onKey = null) {
  closeCompare();
  const overlay = document.createElement("div");
  overlay.id = OVERLAY_ID;
  overlay.className = className;
  Object.assign(overlay.style, {
    position: "fixed", inset: "0", zIndex: "10000", background: "rgba(0,0,0,0.85)", display: "flex",
    alignItems: "center", justifyContent: "center", flexDirection: "column", color: "#ddd",
    font: "13px sans-serif",
  });
  const caption = document.createElement("div");
  caption.style.margin = "8px";
  overlay.appendChild(caption);
  overlay.addEventListener("click", (e) => { if (e.target === overlay) closeCompare(); });
  const keys = (e) => {
    if (!document.body.contains(overlay)) return document.removeEventListener("keydown", keys);
    if (e.key === "Escape") closeCompare();
    else onKey?.(e);
  };
  document.addEventListener("keydown", keys);
  return { overlay, caption };
}

function openCompare(node, index = 0) {
  const pair = node.__ecodiffImages;
  const { overlay, caption } = openOverlay("ecodiff-compare", (e) => {
    if (pair && (e.key === "ArrowRight" || e.key === "ArrowLeft")) {
      const n = Math.min(pair.a.length, pair.b.length);
      openCompare(node, (index + (e.key === "ArrowRight" ? 1 : n - 1)) % n);
    }
  });
  if (!pair || !pair.a.length || !pair.b.length) {
    caption.textContent = "Run the workflow first: the compare view shows the last images of this node. (Esc closes)";
    document.body.appendChild(overlay);
    return overlay;
  }
  const count = Math.min(pair.a.length, pair.b.length);
  const labelA = widgetValue(node, "label_a", "A"), labelB = widgetValue(node, "label_b", "B");
  caption.textContent = `${labelA} | ${labelB}  —  drag across the image` +
    (count > 1 ? `  —  image ${index + 1} of ${count} (←/→)` : "") + "  —  Esc closes";
  const frame = document.createElement("div");
  frame.className = "ecodiff-compare-frame";
  Object.assign(frame.style, { position: "relative", maxWidth: "90vw", maxHeight: "80vh", cursor: "ew-resize",
                               userSelect: "none", lineHeight: "0" });
  const imgB = document.createElement("img");
  const imgA = document.createElement("img");
  imgB.src = viewUrl(pair.b[index]);
  imgA.src = viewUrl(pair.a[index]);
  imgB.className = "ecodiff-compare-b";
  imgA.className = "ecodiff-compare-a";
  for (const img of [imgA, imgB]) {
    img.draggable = false;
    Object.assign(img.style, { maxWidth: "90vw", maxHeight: "80vh", display: "block", imageRendering: "auto" });
  }
  Object.assign(imgA.style, { position: "absolute", left: "0", top: "0", width: "100%", height: "100%" });
  imgB.addEventListener("load", () => { // small images (previews, tests) are shown at least 512 px wide
    const w = imgB.naturalWidth, h = imgB.naturalHeight;
    if (!w || !h) return;
    const scale = Math.min(0.9 * innerWidth / w, 0.8 * innerHeight / h, Math.max(1, 512 / Math.max(w, h)));
    imgB.style.width = `${Math.round(w * scale)}px`;
    imgB.style.height = `${Math.round(h * scale)}px`;
    if (scale > 1) imgA.style.imageRendering = imgB.style.imageRendering = "pixelated";
  });
  const divider = document.createElement("div");
  Object.assign(divider.style, { position: "absolute", top: "0", bottom: "0", width: "2px", background: "#fff",
                                 boxShadow: "0 0 4px #000", pointerEvents: "none" });
  const tagA = document.createElement("span");
  const tagB = document.createElement("span");
  tagA.textContent = labelA;
  tagB.textContent = labelB;
  for (const [tag, side] of [[tagA, "left"], [tagB, "right"]]) {
    Object.assign(tag.style, { position: "absolute", top: "6px", [side]: "6px", background: "rgba(0,0,0,0.6)",
                               padding: "2px 6px", lineHeight: "1.4", pointerEvents: "none" });
  }
  const setSplit = (fraction) => {
    const f = Math.min(1, Math.max(0, fraction));
    imgA.style.clipPath = `inset(0 ${100 - 100 * f}% 0 0)`;
    divider.style.left = `calc(${100 * f}% - 1px)`;
    frame.dataset.split = f.toFixed(3);
  };
  frame.addEventListener("pointermove", (e) => {
    const r = frame.getBoundingClientRect();
    if (r.width > 0) setSplit((e.clientX - r.left) / r.width);
  });
  setSplit(0.5);
  frame.append(imgB, imgA, divider, tagA, tagB);
  overlay.appendChild(frame);
  document.body.appendChild(overlay);
  return overlay;
}

// --------------------------------------------------------------------------------------------
// pruning report view
// --------------------------------------------------------------------------------------------
function addReportButton(node) {
  addButton(node, REPORT_BUTTON, () => openReport(node));
}

/** The report's chart at its real size (scrolls when taller than the window) beside the table. */
function openReport(node) {
  const report = node.__ecodiffReport;
  const { overlay, caption } = openOverlay("ecodiff-report");
  if (!report) {
    caption.textContent = "Run the workflow first: the report view shows the last report of this node. (Esc closes)";
    document.body.appendChild(overlay);
    return overlay;
  }
  caption.textContent = "EcoDiff pruning report  —  Esc closes";
  const body = document.createElement("div");
  body.className = "ecodiff-report-body";
  Object.assign(body.style, { display: "flex", gap: "16px", alignItems: "flex-start", maxWidth: "96vw",
                              maxHeight: "86vh", overflow: "auto" });
  const table = document.createElement("pre");
  table.className = "ecodiff-report-table";
  table.textContent = report.text;
  Object.assign(table.style, { margin: "0", padding: "8px", background: "#1b1b1b", color: "#ddd",
                               font: "12px monospace", whiteSpace: "pre" });
  body.appendChild(table);
  for (const image of report.images) {
    const img = document.createElement("img");
    img.className = "ecodiff-report-chart";
    img.src = viewUrl(image);
    img.draggable = false;
    img.style.background = "#fff";
    body.appendChild(img);
  }
  overlay.appendChild(body);
  document.body.appendChild(overlay);
  return overlay;
}

// --------------------------------------------------------------------------------------------
function onExecuted(detail) {
  const node = resolveNode(detail?.display_node ?? detail?.node);
  if (!node || !isEcoDiff(node)) return;
  const out = detail.output ?? {};
  const cls = nodeClass(node);
  if (out.text != null && (Array.isArray(out.text) ? out.text.length : true)) showText(node, out.text);
  if (cls === COMPARE_NODE && Array.isArray(out.a_images) && Array.isArray(out.b_images)) {
    node.__ecodiffImages = { a: out.a_images, b: out.b_images };
    addCompareButton(node);
  }
  if (cls === REPORT_NODE) node.__ecodiffReport = { text: resultText(out.text), images: out.images ?? [] };
}

// --------------------------------------------------------------------------------------------
app.registerExtension({
  name: EXTENSION,
  async setup() {
    api.addEventListener(LEARN_EVENT, (e) => onLearnEvent(e.detail));
    api.addEventListener("executed", (e) => onExecuted(e.detail));
    console.log(`[EcoDiff] web extension ${VERSION} loaded`);
  },
  nodeCreated(node) {
    if (!isEcoDiff(node)) return;
    const cls = nodeClass(node);
    fixSeedControls(node); // a loaded workflow then sets its own saved value
    if (TEXT_NODES.has(cls)) addTextWidget(node);
    if (CHART_NODES.has(cls)) addChart(node);
    else if (cls === COMPARE_NODE) addCompareButton(node);
    else if (cls === REPORT_NODE) addReportButton(node);
  },
  loadedGraphNode(node) {
    if (isEcoDiff(node)) fitHeight(node);
  },
  // for tests and other extensions
  ecodiff: { version: VERSION, onLearnEvent, onExecuted, openCompare, openReport, closeCompare, resolveNode },
});
