import assert from "node:assert/strict";
import { test } from "node:test";

import {
  cellAt, countStrategies, describeCell, drawHeatmap, layout, parseLegend, parsePlan,
} from "../../web/heatmap.js";

// What nodes/types.py sends (the Strategy table); tests/unit/test_web.py checks it matches.
const LEGEND = [
  { letter: "F", label: "FULL", colour: "#5b6270" },
  { letter: "W", label: "WA-RS", colour: "#3b82f6" },
  { letter: "C", label: "ASC", colour: "#f59e0b" },
  { letter: "X", label: "WA-RS+ASC", colour: "#10b981" },
  { letter: "T", label: "AST", colour: "#ef4444" },
  { letter: "A", label: "WA", colour: "#a5b4fc" },
  { letter: "S", label: "Sol-Attn", colour: "#8b5cf6" },
];
const legend = parseLegend(LEGEND);

test("parseLegend keeps the pack's order and refuses what is not a legend", () => {
  assert.deepEqual([...legend.keys()], ["F", "W", "C", "X", "T", "A", "S"]);
  assert.equal(legend.get("W").label, "WA-RS");
  for (const bad of [null, [], [{ letter: "FF", label: "x", colour: "#000000" }],
    [{ letter: "F", label: "x", colour: "red;background:url(x)" }],
    [{ letter: "F", label: "x", colour: "#000000" }, { letter: "F", label: "y", colour: "#111111" }]]) {
    assert.equal(parseLegend(bad), null);
  }
});

test("parsePlan transposes steps x layers into layers x steps", () => {
  const p = parsePlan(["FFF", "TWC", "XTF"], legend);
  assert.equal(p.steps, 3);
  assert.equal(p.layers, 3);
  assert.deepEqual(p.cells[1], ["F", "W", "T"]);
});

test("parsePlan refuses what is not a plan, or letters the legend does not know", () => {
  for (const bad of [null, [], ["FF", "F"], ["FZ"], [3], "FF", [""]]) assert.equal(parsePlan(bad, legend), null);
  assert.equal(parsePlan(["FW"], parseLegend(LEGEND.slice(0, 1))), null);
  assert.equal(parsePlan(["FW"], null), null);
});

test("a strategy added on the Python side is drawn without a JS change", () => {
  const wider = parseLegend([...LEGEND, { letter: "Q", label: "NEW", colour: "#123456" }]);
  const p = parsePlan(["FQ"], wider);
  assert.deepEqual(countStrategies(p, wider), { F: 1, W: 0, C: 0, X: 0, T: 0, A: 0, S: 0, Q: 1 });
});

test("layout fills the box and cellAt finds the cell under a point", () => {
  const p = parsePlan(["FF", "TW"], legend);
  const box = layout(p, 100, 50);
  assert.equal(box.cellWidth, 50);
  assert.equal(box.cellHeight, 25);
  assert.deepEqual(cellAt(p, box, 60, 30), { step: 1, layer: 1, letter: "W" });
  assert.deepEqual(cellAt(p, box, 10, 10), { step: 0, layer: 0, letter: "F" });
  assert.equal(cellAt(p, box, 100, 10), null);
  assert.equal(cellAt(p, box, -1, 10), null);
  assert.equal(describeCell({ step: 1, layer: 1, letter: "W" }, legend), "step 2, layer 2: WA-RS (W)");
});

test("drawHeatmap paints one cell per (layer, step) in its strategy colour", () => {
  const fills = [];
  const ctx = { fillStyle: "", fillRect(x, y, w, h) { fills.push([this.fillStyle, x, y, w, h]); } };
  drawHeatmap(ctx, parsePlan(["FT", "WC"], legend), legend, 40, 60);
  assert.deepEqual(fills, [
    ["#5b6270", 0, 0, 20, 30], ["#3b82f6", 20, 0, 20, 30],
    ["#ef4444", 0, 30, 20, 30], ["#f59e0b", 20, 30, 20, 30],
  ]);
});
