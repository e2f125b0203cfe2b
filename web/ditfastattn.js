// ComfyUI frontend extension: draws the plan heatmap (layers x steps) on the pack's nodes
// once they have run (Calibrate, Load, Save), and on Load Plan as soon as an embedded plan
// is pasted.
import { app } from "../../scripts/app.js";
import { drawHeatmap, parsePlan } from "./heatmap.js";

const UI_KEY = "ditfastattn_plan";
const HEATMAP_HEIGHT = 140;

function showPlan(node, rows, summary) {
  const parsed = parsePlan(rows);
  if (!parsed) return;
  const grow = !node.fastattnPlan;
  node.fastattnPlan = { parsed, summary: summary ?? "" };
  if (grow) node.setSize([Math.max(node.size[0], 300), node.size[1] + HEATMAP_HEIGHT]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "ditfastattn.planHeatmap",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("DiTFastAttn_")) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const plan = message?.[UI_KEY]?.[0];
      if (plan) showPlan(this, plan.strategies, plan.summary);
    };

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const embedded = this.widgets?.find((w) => w.name === "embedded_plan");
      if (!embedded) return;
      const callback = embedded.callback;
      embedded.callback = (value, ...rest) => {
        callback?.call(embedded, value, ...rest);
        try {
          showPlan(this, JSON.parse(value)?.strategies, "embedded plan");
        } catch {
          // not JSON (yet): nothing to draw; the node validates the plan when it runs
        }
      };
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.fastattnPlan || this.flags?.collapsed) return;
      const pad = 10;
      const top = this.size[1] - HEATMAP_HEIGHT + 4;
      drawHeatmap(ctx, this.fastattnPlan.parsed, pad, top, this.size[0] - 2 * pad, HEATMAP_HEIGHT - 8,
        this.fastattnPlan.summary);
    };
  },
});
