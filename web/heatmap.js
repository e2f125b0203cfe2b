// Plan heatmap: layers (rows) x steps (columns), one colour per strategy, like Figure 5 of
// the DiTFastAttn paper. Pure functions, no ComfyUI imports: tests/web/heatmap.test.mjs runs
// them under node. The strategies' letters, labels and colours are not written here: they come
// with the plan from the Python side (the Strategy table), as a legend:
//   [{letter, label, colour: "#rrggbb"}, ...] (ditfastattn_core/strategies.py: legend())

const MAX_CELLS = 1_000_000;
const COLOUR = /^#[0-9a-fA-F]{6}$/;

// A legend as sent by the pack -> Map(letter -> {label, colour}), or null when it is not one
// (the UI never trusts what it is shown: a colour goes into a style, a label into text only).
export function parseLegend(legend) {
  if (!Array.isArray(legend) || legend.length === 0 || legend.length > 32) return null;
  const byLetter = new Map();
  for (const entry of legend) {
    const { letter, label, colour } = entry ?? {};
    if (typeof letter !== "string" || letter.length !== 1 || byLetter.has(letter)) return null;
    if (typeof label !== "string" || label.length > 40 || typeof colour !== "string" || !COLOUR.test(colour)) {
      return null;
    }
    byLetter.set(letter, { label, colour });
  }
  return byLetter;
}

// A plan's strategy rows (one string per step) -> {steps, layers, cells[layer][step]}, or null
// when the data is not a plan drawn with this legend.
export function parsePlan(rows, legend) {
  if (!(legend instanceof Map) || !Array.isArray(rows) || rows.length === 0) return null;
  const layers = rows[0]?.length;
  if (typeof layers !== "number" || layers === 0 || rows.length * layers > MAX_CELLS) return null;
  for (const row of rows) {
    if (typeof row !== "string" || row.length !== layers) return null;
    for (const ch of row) if (!legend.has(ch)) return null;
  }
  const cells = [];
  for (let layer = 0; layer < layers; layer++) {
    cells.push(rows.map((row) => row[layer]));
  }
  return { steps: rows.length, layers, cells };
}

// Strategy counts in legend order, for the legend's labels.
export function countStrategies(parsed, legend) {
  const counts = Object.fromEntries([...legend.keys()].map((k) => [k, 0]));
  for (const row of parsed.cells) for (const ch of row) counts[ch] += 1;
  return counts;
}

// The cells fill the box: a step is a column, a layer a row.
export function layout(parsed, width, height) {
  const cellWidth = width / parsed.steps;
  const cellHeight = height / parsed.layers;
  return {
    cellWidth,
    cellHeight,
    x: (step) => step * cellWidth,
    y: (layer) => layer * cellHeight,
  };
}

// The (step, layer) under a point of the box, or null outside it.
export function cellAt(parsed, box, x, y) {
  const step = Math.floor(x / box.cellWidth);
  const layer = Math.floor(y / box.cellHeight);
  if (!(step >= 0 && step < parsed.steps && layer >= 0 && layer < parsed.layers)) return null;
  return { step, layer, letter: parsed.cells[layer][step] };
}

// Draw the cells on a 2D canvas context filling width x height (the legend and summary are
// HTML beside the canvas, so they wrap and stay readable at any zoom).
export function drawHeatmap(ctx, parsed, legend, width, height) {
  const box = layout(parsed, width, height);
  for (let layer = 0; layer < parsed.layers; layer++) {
    const y0 = Math.round(box.y(layer));
    const y1 = Math.round(box.y(layer + 1));
    for (let step = 0; step < parsed.steps; step++) {
      const x0 = Math.round(box.x(step));
      const x1 = Math.round(box.x(step + 1));
      ctx.fillStyle = legend.get(parsed.cells[layer][step]).colour;
      ctx.fillRect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0));
    }
  }
  return box;
}

// What the hover line says about one cell.
export function describeCell(cell, legend) {
  const info = legend.get(cell.letter);
  return `step ${cell.step + 1}, layer ${cell.layer + 1}: ${info.label} (${cell.letter})`;
}
