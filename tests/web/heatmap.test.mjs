import assert from "node:assert/strict";
import { test } from "node:test";

import { countStrategies, drawHeatmap, layout, parsePlan } from "../../web/heatmap.js";

test("parsePlan transposes steps x layers into layers x steps", () => {
  const p = parsePlan(["FFF", "TWC", "XTF"]);
  assert.equal(p.steps, 3);
  assert.equal(p.layers, 3);
  assert.deepEqual(p.cells[1], ["F", "W", "T"]);
});

test("parsePlan refuses what is not a plan", () => {
  for (const bad of [null, [], ["FF", "F"], ["FZ"], [3], "FF", [""]]) assert.equal(parsePlan(bad), null);
});

test("counts and layout", () => {
  const p = parsePlan(["FF", "TW"]);
  assert.deepEqual(countStrategies(p), { F: 2, W: 1, C: 0, X: 0, T: 1 });
  const box = layout(p, 100, 50);
  assert.equal(box.cell, 25);
  assert.equal(box.x(1), 25);
});

test("drawHeatmap paints one cell per (layer, step) in its strategy colour", () => {
  const fills = [];
  const ctx = {
    fillStyle: "",
    font: "",
    fillRect(x, y, w, h) { fills.push([this.fillStyle, x, y, w, h]); },
    fillText() {},
    measureText: (s) => ({ width: s.length * 5 }),
  };
  const used = drawHeatmap(ctx, parsePlan(["FT", "WC"]), 0, 0, 40, 60, "summary");
  assert.ok(used > 0);
  const cells = fills.slice(0, 4);
  assert.deepEqual(cells.map((c) => c[0]), ["#5b6270", "#3b82f6", "#ef4444", "#f59e0b"]);
});
