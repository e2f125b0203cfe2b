"""Apply FastAttn: MODEL + PLAN -> a patched MODEL clone."""

from __future__ import annotations

from comfy_api.latest import io

from ..ditfastattn_core.comfy_bridge import apply_config, install
from ..ditfastattn_core.comfy_bridge.attention_chain import CORE_SPARSE_ORDER, has_core_sparse_attention
from ..ditfastattn_core.kernels import kernel_names
from ..ditfastattn_core.state import CachePlacement
from ..ditfastattn_core.steps import STEP_MODES, STRICT
from .types import Plan, check_window_kernel, describe, plan_ui


def run_options() -> list:
    """How a plan runs, in the order saved workflows hold them: the inputs Apply FastAttn and
    Apply FastAttn (Ray) share after their model and plan."""
    return [
        io.Combo.Input("window_kernel", options=kernel_names(), default="auto",
                       tooltip="Window-attention kernel; auto picks the fastest that can run the plan's window on "
                       "the device that samples."),
        io.Combo.Input("step_matching", options=list(STEP_MODES), default=STRICT,
                       tooltip="strict: the sampler samples the plan's schedule or a range of it (KSamplerAdvanced "
                       "start/end steps, denoise), matched by sigma, or uses the plan's step count. normalised: "
                       "otherwise map steps by their relative position (a plan for 20 steps on 30)."),
        io.Combo.Input("cache_placement", options=[p.value for p in CachePlacement],
                       default=CachePlacement.DEVICE.value, optional=True,
                       tooltip="Where the plan's caches (window residuals, reused outputs) live: beside the model, "
                       "or in CPU memory (pinned, copied without blocking) to free GPU memory for one copy each way "
                       "per use. Each GPU holds its own."),
    ]


class ApplyFastAttn(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_Apply",
            display_name="Apply FastAttn",
            category="model_patches/ditfastattn",
            description="Compress the self-attention of a diffusion transformer with a FastAttn plan "
            "(window attention with residual sharing, step sharing, CFG sharing). The plan is checked "
            "against the model before sampling.",
            inputs=[
                io.Model.Input("model", tooltip="A diffusion transformer (PixArt, Flux, SD3, Wan, ...)."),
                Plan.Input("plan", tooltip="From Load Plan or Calibrate FastAttn Plan."),
                *run_options(),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: the latent you will sample, to state the cache memory at its "
                                "size and batch (else at the plan's calibration size, batch 1)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with FastAttn; bypass this node to turn it off.")],
        )

    @classmethod
    def validate_inputs(cls, window_kernel: str = "auto") -> bool | str:
        """Takes only ``window_kernel``: ComfyUI reports a refusal once per argument listed here."""
        return check_window_kernel(window_kernel)

    @classmethod
    def execute(cls, model, plan, window_kernel: str, step_matching: str,
                cache_placement: str = CachePlacement.DEVICE.value, latent: dict | None = None) -> io.NodeOutput:
        config = apply_config(model, plan, kernel=window_kernel, step_mode=step_matching,
                              cache_placement=CachePlacement(cache_placement))
        shape = tuple(latent["samples"].shape) if latent is not None else None
        summary = f"{describe(plan)}\n{config.describe_caches(shape, model.model_options)}"
        if has_core_sparse_attention(model):
            summary += f"\n{CORE_SPARSE_ORDER}"
        return io.NodeOutput(install(model, config), ui=plan_ui(plan, summary))
