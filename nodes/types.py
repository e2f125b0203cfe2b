"""The PLAN socket type and what the nodes that carry a plan show in the UI."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..ditfastattn_core.kernels import unknown_kernel
from ..ditfastattn_core.plan import Plan as PlanData
from ..ditfastattn_core.strategies import legend

Plan = io.Custom("FASTATTN_PLAN")

UI_KEY = "ditfastattn_plan"
"""web/ditfastattn.js draws the plan heatmap on nodes whose execution result carries this key."""

_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def search_aliases(*names: str) -> dict:
    """``search_aliases`` for io.Schema where this ComfyUI has them (added after 0.3.64)."""
    return {"search_aliases": list(names)} if "search_aliases" in _SCHEMA_FIELDS else {}


def plan_ui(plan: PlanData, summary: str) -> dict:
    """The heatmap's data: the plan's letters, the summary and the strategy legend (labels and
    colours come from the Strategy table, so the frontend holds no copy of it)."""
    return {UI_KEY: [{"strategies": plan.schedule.to_letters(), "summary": summary, "legend": legend()}]}


def check_window_kernel(window_kernel: str) -> bool | str:
    """A node's ``validate_inputs`` answer for its window_kernel combo: ComfyUI 0.3.64 does not
    check a V3 combo's value against its options itself (0.29 does)."""
    return unknown_kernel(window_kernel) or True


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
