// Plan heatmap: layers (rows) x steps (columns), one colour per strategy, like Figure 5 of
// the DiTFastAttn paper. Pure functions, no ComfyUI imports: tests/web/heatmap.test.mjs runs
// them under node.

export const STRATEGIES = {
  F: { name: "FULL", color: "#5b6270" },
  W: { name: "WA-RS", color: "#3b82f6" },
  C: { name: "ASC", color: "#f59e0b" },
  X: { name: "WA-RS+ASC", color: "#10b981" },
  T: { name: "AST", color: "#ef4444" },
};

const MAX_CELLS = 1_000_000;

// A plan's strategy rows (one string per step) -> {steps, layers, cells[layer][step]}, or null
// when the data is not a plan this pack wrote (the UI never trusts what it is shown).
export function parsePlan(rows) {
  if (!Array.isArray(rows) || rows.length === 0) return null;
  const layers = rows[0]?.length;
  if (typeof layers !== "number" || layers === 0 || rows.length * layers > MAX_CELLS) return null;
  for (const row of rows) {
    if (typeof row !== "string" || row.length !== layers) return null;
    for (const ch of row) if (!(ch in STRATEGIES)) return null;
  }
  const cells = [];
  for (let layer = 0; layer < layers; layer++) {
    cells.push(rows.map((row) => row[layer]));
  }
  return { steps: rows.length, layers, cells };
}

// Strategy counts, for the legend.
export function countStrategies(parsed) {
  const counts = Object.fromEntries(Object.keys(STRATEGIES).map((k) => [k, 0]));
  for (const row of parsed.cells) for (const ch of row) counts[ch] += 1;
  return counts;
}

// Where each cell goes inside a box of the given size; cells stay square-ish and at least 1px.
export function layout(parsed, width, height) {
  const cell = Math.max(1, Math.min(width / parsed.steps, height / parsed.layers));
  return {
    cell,
    width: cell * parsed.steps,
    height: cell * parsed.layers,
    x: (step) => step * cell,
    y: (layer) => layer * cell,
  };
}

// Draw on a 2D canvas context at (x, y) within w x h; returns the height used.
export function drawHeatmap(ctx, parsed, x, y, w, h, summary = "") {
  const legendHeight = 14;
  const box = layout(parsed, w, Math.max(8, h - legendHeight - (summary ? 14 : 0)));
  for (let layer = 0; layer < parsed.layers; layer++) {
    for (let step = 0; step < parsed.steps; step++) {
      ctx.fillStyle = STRATEGIES[parsed.cells[layer][step]].color;
      ctx.fillRect(x + box.x(step), y + box.y(layer), Math.ceil(box.cell), Math.ceil(box.cell));
    }
  }
  let cy = y + box.height + 11;
  ctx.font = "10px sans-serif";
  let cx = x;
  const counts = countStrategies(parsed);
  for (const [ch, info] of Object.entries(STRATEGIES)) {
    ctx.fillStyle = info.color;
    ctx.fillRect(cx, cy - 8, 8, 8);
    ctx.fillStyle = "#ccc";
    const label = `${info.name} ${counts[ch]}`;
    ctx.fillText(label, cx + 10, cy);
    cx += 14 + ctx.measureText(label).width;
  }
  if (summary) {
    cy += 13;
    ctx.fillStyle = "#aaa";
    ctx.fillText(summary.split("\n").pop().slice(0, 120), x, cy);
  }
  return cy - y + 3;
}
