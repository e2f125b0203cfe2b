"""The PLAN socket type and what the nodes that carry a plan show in the UI."""

from __future__ import annotations

from comfy_api.latest import io

from ..ditfastattn_core.plan import Plan as PlanData

Plan = io.Custom("FASTATTN_PLAN")

UI_KEY = "ditfastattn_plan"
"""web/ditfastattn.js draws the plan heatmap on nodes whose execution result carries this key."""


def plan_ui(plan: PlanData, summary: str) -> dict:
    return {UI_KEY: [{"strategies": plan.schedule.to_letters(), "summary": summary}]}


def describe(plan: PlanData) -> str:
    cal = plan.calibration
    head = f"{plan.family}, {plan.steps} steps x {plan.layers} layers"
    if plan.sampler:
        head += f", {plan.sampler}/{plan.scheduler}, cfg {plan.cfg:g}"
    if cal.delta is not None:
        head += f", {cal.mode} delta {cal.delta:g}"
    if plan.grid is None:
        return head
    return f"{head}\n{plan.cost().describe()}"
