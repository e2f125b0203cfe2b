// ComfyUI frontend extension: the plan heatmap as a DOM widget on every node that carries a
// plan (a FASTATTN_PLAN input or output: Calibrate, Load, Save, Apply; not the demo helpers). A DOM widget renders in the classic canvas and in
// Nodes 2.0 (where node bodies are not drawn on the canvas, so onDrawForeground never runs).
// The plan is kept in the node's properties, so it is drawn again after a reload and when
// ComfyUI serves the node from its cache (cached nodes send no new result).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { cellAt, countStrategies, describeCell, drawHeatmap, parseLegend, parsePlan } from "./heatmap.js";

const UI_KEY = "ditfastattn_plan"; // the key nodes/types.py puts on a node's result
const PLAN_TYPE = "FASTATTN_PLAN"; // the socket type nodes/types.py defines
const PROPERTY = "ditfastattn_plan";
const WIDGET = "fastattn_heatmap";
const MIN_HEIGHT = 150;
const CANVAS_MIN = 40;
const PLACEHOLDER = "The plan's heatmap (layers x steps) appears here once the node has run.";

// The strategy legend from the pack (GET /ditfastattn/legend), for plans pasted into Load
// Plan's embedded_plan before any node has run; results carry their own copy.
let packLegend = null;
async function fetchLegend() {
  if (packLegend) return packLegend;
  try {
    const response = await api.fetchApi("/ditfastattn/legend");
    if (response.ok) packLegend = await response.json();
  } catch {
    // an older server without the route: pasted plans are drawn once the node has run
  }
  return packLegend;
}

function el(tag, style, text) {
  const node = document.createElement(tag);
  Object.assign(node.style, style);
  if (text !== undefined) node.textContent = text;
  return node;
}

// The widget's element: the heatmap canvas, an HTML legend and a wrapped summary line.
function createView(node) {
  const root = el("div", {
    display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
    minHeight: `${MIN_HEIGHT}px`, boxSizing: "border-box", padding: "2px 4px", overflow: "hidden",
    font: "12px sans-serif", color: "#ddd",
  });
  root.className = "ditfastattn-heatmap";
  const canvas = el("canvas", { flex: "1 1 0", minHeight: `${CANVAS_MIN}px`, width: "100%", display: "block" });
  const legend = el("div", { display: "flex", flexWrap: "wrap", gap: "2px 10px", fontSize: "13px", lineHeight: "16px" });
  const info = el("div", {
    whiteSpace: "pre-wrap", overflowWrap: "anywhere", fontSize: "12px", lineHeight: "15px", color: "#bbb",
    flex: "0 0 auto",
  }, PLACEHOLDER);
  root.append(canvas, legend, info);

  const view = { root, canvas, legend, info, plan: null, box: null };
  view.redraw = () => redraw(view);
  new ResizeObserver(view.redraw).observe(canvas);
  canvas.addEventListener("mousemove", (event) => {
    if (!view.plan || !view.box) return;
    const cell = cellAt(view.plan.parsed, view.box, event.offsetX, event.offsetY);
    const text = cell ? describeCell(cell, view.plan.legend) : view.plan.summary;
    info.textContent = text;
    canvas.title = cell ? text : "";
  });
  canvas.addEventListener("mouseleave", () => {
    if (view.plan) info.textContent = view.plan.summary;
  });
  return view;
}

function redraw(view) {
  const { canvas, plan } = view;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(width * ratio));
  canvas.height = Math.max(1, Math.round(height * ratio));
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  view.box = plan && width > 0 && height > 0 ? drawHeatmap(ctx, plan.parsed, plan.legend, width, height) : null;
}

function renderLegend(view) {
  view.legend.replaceChildren();
  if (!view.plan) return;
  const counts = countStrategies(view.plan.parsed, view.plan.legend);
  for (const [letter, { label, colour }] of view.plan.legend) {
    const item = el("span", { display: "inline-flex", alignItems: "center", gap: "4px", whiteSpace: "nowrap" });
    item.append(el("span", { width: "11px", height: "11px", background: colour, display: "inline-block" }),
      document.createTextNode(`${label} ${counts[letter]}`));
    item.title = `${letter}: ${label}`;
    view.legend.append(item);
  }
}

// Show a plan ({strategies, summary, legend}) on a node and keep it in its properties.
function showPlan(node, data) {
  const legend = parseLegend(data?.legend);
  const parsed = legend && parsePlan(data.strategies, legend);
  const view = node.fastattnView;
  if (!parsed || !view) return false;
  const summary = typeof data.summary === "string" ? data.summary : "";
  view.plan = { parsed, legend, summary };
  view.info.textContent = summary;
  renderLegend(view);
  fitHeight(node);
  view.redraw();
  node.properties ??= {};
  const kept = { strategies: data.strategies, summary, legend: data.legend };
  const changed = JSON.stringify(node.properties[PROPERTY]) !== JSON.stringify(kept);
  node.properties[PROPERTY] = kept;
  node.setDirtyCanvas?.(true, true);
  // A result changes no widget, so the editor would not save the workflow (and the plan in
  // the node's properties) until the next edit: tell its change tracker.
  if (changed) app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  return true;
}

// The legend and the whole summary (the cache memory line included) are never clipped: once
// drawn, a node whose widget overflows grows by what is missing, at its width. Only measured
// where the widget is laid out at a usable width (hidden or zoomed-out widgets wrap every
// character onto a line of its own, which says nothing about the node at its real size).
function fitHeight(node) {
  requestAnimationFrame(() => {
    const root = node.fastattnView?.root;
    if (!root || root.offsetParent === null || root.clientWidth < 120) return;
    const missing = root.scrollHeight - root.clientHeight;
    if (missing > 0) {
      node.setSize([node.size[0], node.size[1] + missing]);
      node.setDirtyCanvas?.(true, true);
    }
  });
}

// A node shows a plan when a plan flows through it: a FASTATTN_PLAN input or output.
function carriesPlan(nodeData) {
  const inputs = { ...nodeData?.input?.required, ...nodeData?.input?.optional };
  return (nodeData?.output ?? []).includes(PLAN_TYPE) || Object.values(inputs).some((spec) => spec?.[0] === PLAN_TYPE);
}

app.registerExtension({
  name: "ditfastattn.planHeatmap",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("DiTFastAttn_") || !carriesPlan(nodeData)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const view = createView(this);
      this.fastattnView = view;
      this.addDOMWidget(WIDGET, WIDGET, view.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => MIN_HEIGHT,
      });
      this.setSize([Math.max(this.size[0], 320), this.computeSize()[1]]);

      const embedded = this.widgets?.find((w) => w.name === "embedded_plan");
      if (embedded) {
        const callback = embedded.callback;
        embedded.callback = (value, ...rest) => {
          const out = callback?.call(embedded, value, ...rest);
          showPasted(this, value);
          return out;
        };
      }
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const kept = this.properties?.[PROPERTY];
      if (kept) showPlan(this, kept);
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const plan = message?.[UI_KEY]?.[0];
      if (plan) showPlan(this, plan);
    };
  },
});

async function showPasted(node, value) {
  let strategies;
  try {
    strategies = JSON.parse(value)?.strategies;
  } catch {
    return; // not JSON (yet): nothing to draw; the node validates the plan when it runs
  }
  const legend = node.properties?.[PROPERTY]?.legend ?? (await fetchLegend());
  if (legend) showPlan(node, { strategies, summary: "embedded plan (validated when the node runs)", legend });
}
