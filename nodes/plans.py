"""Save Plan and Load Plan."""

from __future__ import annotations

import os

from comfy_api.latest import io

from ..ditfastattn_core.plan import Plan as PlanData
from ..ditfastattn_core.plan_files import clean_name, read_plan, save_plan
from . import plan_folder
from .types import Plan, describe, plan_ui, search_aliases

EMBEDDED_HELP = (
    "Optional: a plan's JSON text. When set it is used instead of the file, so a shared workflow "
    "can carry its plan. It is validated like a file; nothing in it is executed."
)


class SavePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_SavePlan",
            display_name="Save Plan",
            **search_aliases("Save FastAttn Plan", "fastattn", "ditfastattn"),
            category="model_patches/ditfastattn",
            description="Save a plan as JSON in models/fastattn_plans.",
            inputs=[
                Plan.Input("plan"),
                io.String.Input("name", default="my_plan", tooltip="File name: letters, digits, spaces, "
                                "'_', '-', '.'; saved as <name>.json."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a plan of the same name."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name: str) -> bool | str:
        """Takes only ``name``: ComfyUI reports a refusal once per argument listed here."""
        try:
            clean_name(name)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, plan: PlanData, name: str, overwrite: bool) -> io.NodeOutput:
        path = save_plan(plan, plan_folder.save_folder(), name, overwrite=overwrite)
        summary = f"saved {path.name}\n{describe(plan)}"
        return io.NodeOutput(str(path), ui={**plan_ui(plan, summary), "text": [summary]})


class LoadPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_LoadPlan",
            display_name="Load Plan",
            **search_aliases("Load FastAttn Plan", "fastattn", "ditfastattn"),
            category="model_patches/ditfastattn",
            description="Load a plan from models/fastattn_plans (or the pack's plans), or from JSON "
            "embedded in the workflow.",
            inputs=[
                io.Combo.Input("plan_name", options=plan_folder.plan_names() or ["(none)"],
                               tooltip="Plans in models/fastattn_plans and the pack's plans/ folder."),
                io.String.Input("embedded_plan", multiline=True, default="", optional=True,
                                tooltip=EMBEDDED_HELP),
            ],
            outputs=[Plan.Output(), io.String.Output(display_name="summary")],
        )

    @classmethod
    def validate_inputs(cls, plan_name: str, embedded_plan: str = "") -> bool | str:
        """A name not in the list is refused before the run (unless a plan is embedded, so a
        shared workflow runs where the sharer's file does not exist)."""
        if (embedded_plan and embedded_plan.strip()) or plan_name in plan_folder.plan_names():
            return True
        return plan_folder.unknown_plan_message(plan_name)

    @classmethod
    def fingerprint_inputs(cls, plan_name: str, embedded_plan: str = "") -> str:
        """Re-run when the file changes on disk, not only when the name does."""
        if embedded_plan and embedded_plan.strip():
            return embedded_plan
        try:
            stat = os.stat(plan_folder.plan_path(plan_name))
        except (OSError, FileNotFoundError):
            return plan_name
        return f"{plan_name}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def execute(cls, plan_name: str, embedded_plan: str = "") -> io.NodeOutput:
        if embedded_plan and embedded_plan.strip():
            plan = PlanData.loads(embedded_plan)
        else:
            plan = read_plan(plan_folder.plan_path(plan_name))
        summary = describe(plan)
        return io.NodeOutput(plan, summary, ui=plan_ui(plan, summary))
