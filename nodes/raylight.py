"""Apply FastAttn (Ray): RAY_ACTORS + PLAN -> the same actors, their models carrying the plan."""

from __future__ import annotations

from comfy_api.latest import io

from ..ditfastattn_core.comfy_bridge.raylight import install_on_workers
from ..ditfastattn_core.state import CachePlacement
from .apply import run_options
from .types import Plan, check_window_kernel, describe, plan_ui

RayActors = io.Custom("RAY_ACTORS")
"""raylight's socket type for its Ray workers (Load Diffusion Model (Ray) outputs it)."""


class ApplyFastAttnRay(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_ApplyRay",
            display_name="Apply FastAttn (Ray)",
            category="model_patches/ditfastattn",
            description="Apply a FastAttn plan on every GPU of a raylight run (sequence parallel, CFG parallel, "
            "data parallel, FSDP): connect it between Load Diffusion Model (Ray) and raylight's sampler. The "
            "plan is the one Calibrate wrote on one GPU, checked against the model on the workers.",
            inputs=[
                RayActors.Input("ray_actors", tooltip="From Load Diffusion Model (Ray)."),
                Plan.Input("plan", tooltip="From Load Plan or Calibrate FastAttn Plan."),
                *run_options(),
            ],
            outputs=[RayActors.Output(tooltip="The same workers, their models with FastAttn: connect raylight's "
                                      "sampler here.")],
        )

    @classmethod
    def validate_inputs(cls, window_kernel: str = "auto") -> bool | str:
        """Takes only ``window_kernel``: ComfyUI reports a refusal once per argument listed here."""
        return check_window_kernel(window_kernel)

    @classmethod
    def execute(cls, ray_actors, plan, window_kernel: str, step_matching: str,
                cache_placement: str = CachePlacement.DEVICE.value) -> io.NodeOutput:
        options = {"kernel": window_kernel, "step_mode": step_matching,
                   "cache_placement": CachePlacement(cache_placement).value}
        summary = install_on_workers(ray_actors, plan.to_json(), options)
        return io.NodeOutput(ray_actors, ui=plan_ui(plan, f"{describe(plan)}\n{summary}"))
