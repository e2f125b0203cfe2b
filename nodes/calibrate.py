"""Calibrate FastAttn Plan: a KSampler that also chooses a strategy per (step, layer)."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..ditfastattn_core.calibrate import GUIDED, MODES
from ..ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate
from ..ditfastattn_core.kernels import kernel_names
from ..ditfastattn_core.strategies import CANDIDATE_ORDER, SWITCHES, SWITCHES_IN_PLACE
from ..ditfastattn_core.window import FAMILY_DEFAULT
from ..ditfastattn_core.window import PRESETS as WINDOWS
from .types import Plan, check_window_kernel, plan_ui

CANDIDATE_INPUTS = {f"use_{s.name.lower()}": s for s in CANDIDATE_ORDER}
"""One switch per calibration candidate, from the strategy table; the node shows the offered ones
(``Strategy.offered``), and takes an ablation's switch from Python callers (bench/ablations.py)."""


def switch_inputs(strategies, in_place: bool) -> list:
    """The node's ``use_...`` inputs of the offered candidates, by ``Strategy.switch``: those in
    place (required, where saved workflows have them) or the later ones (optional, appended),
    so that a new strategy never shifts the widget values of a saved workflow. A switch starts as
    its row says (``Strategy.default_on``; a stand-in row without one starts on)."""
    return [io.Boolean.Input(f"use_{s.name.lower()}", default=getattr(s, "default_on", True),
                             tooltip=s.description, **({} if in_place else {"optional": True}))
            for s in strategies if (s.switch < SWITCHES_IN_PLACE) == in_place]


class CalibratePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiTFastAttn_Calibrate",
            display_name="Calibrate FastAttn Plan",
            category="model_patches/ditfastattn",
            description="Sample once like a KSampler while choosing, for every step and attention layer, "
            "the cheapest technique whose output error stays within delta. Outputs the plan and the "
            "latent the compressed model produced.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("delta", default=0.1, min=0.001, max=10.0, step=0.005,
                               tooltip="delta: allowed mean relative error of the model output (the "
                               "paper's threshold; layer i may use up to (i+1)/L of it). Larger is faster."),
                io.Combo.Input("mode", options=list(MODES), default=GUIDED,
                               tooltip="guided (default): one forward per step, each layer's error measured on "
                               "the CFG-guided prediction the sampler uses (about one generation; on the demo "
                               "model half paper mode's error at equal FLOPs). fast: one forward per step plus "
                               "a reference, local errors with a learned scale (about two generations). paper: "
                               "the paper's greedy search on the whole output (4L+2 forwards per step)."),
                *switch_inputs(SWITCHES, in_place=True),
                io.Combo.Input("window", options=[FAMILY_DEFAULT, *WINDOWS], default=FAMILY_DEFAULT,
                               tooltip="The window of WA-RS; stored in the plan. The family default is the window "
                               "the pack's window study found best for the model's kind (image or video); the "
                               "summary names it."),
                io.Int.Input("samples", default=1, min=1, max=64,
                             tooltip="Calibrate on this many seeds (seed, seed+1, ...) at once: one joint decision."),
                io.Combo.Input("window_kernel", options=kernel_names(), default="auto"),
                io.Int.Input("start_at_step", default=0, min=0, max=10000, optional=True,
                             tooltip="As KSamplerAdvanced: calibrate and sample from this step on (e.g. the "
                             "second expert of Wan 2.2)."),
                io.Int.Input("end_at_step", default=10000, min=0, max=10000, optional=True,
                             tooltip="As KSamplerAdvanced: stop at this step (e.g. the first expert of Wan 2.2)."),
                io.Boolean.Input("add_noise", default=True, optional=True,
                                 tooltip="As KSamplerAdvanced: off when the latent already holds the noise "
                                 "(the output of a previous sampler with leftover noise)."),
                io.Boolean.Input("return_with_leftover_noise", default=False, optional=True,
                                 tooltip="As KSamplerAdvanced: on to hand a noisy latent to the next sampler."),
                *switch_inputs(SWITCHES, in_place=False),
            ],
            outputs=[Plan.Output(), io.Latent.Output(), io.String.Output(display_name="summary")],
        )

    @classmethod
    def validate_inputs(cls, window_kernel: str = "auto") -> bool | str:
        """Takes only ``window_kernel``: ComfyUI reports a refusal once per argument listed here."""
        return check_window_kernel(window_kernel)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise, delta, mode, window, samples, window_kernel, start_at_step=0, end_at_step=10000,
                add_noise=True, return_with_leftover_noise=False, **use_candidate: bool) -> io.NodeOutput:
        if window != FAMILY_DEFAULT and window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; choose one of {[FAMILY_DEFAULT, *WINDOWS]}")
        unknown = set(use_candidate) - set(CANDIDATE_INPUTS)
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}")
        candidates = tuple(s for name, s in CANDIDATE_INPUTS.items()
                           if use_candidate.get(name, s.offered and s.default_on))
        request = CalibrationRequest(
            seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            delta=delta, mode=mode, candidates=candidates, window=WINDOWS.get(window), samples=samples,
            kernel=window_kernel, start_step=start_at_step, end_step=end_at_step, add_noise=add_noise,
            return_with_leftover_noise=return_with_leftover_noise,
        )
        pbar = comfy.utils.ProgressBar(1)

        def on_progress(done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, total)

        result = calibrate(model, positive, negative, latent_image, request, on_progress=on_progress)
        out = latent_image.copy()
        out.pop("downscale_ratio_spacial", None)  # as KSampler does: the ratios described the empty latent
        out.pop("downscale_ratio_temporal", None)
        out["samples"] = result.samples
        if samples > 1:
            out.pop("batch_index", None)
        summary = result.summary()
        return io.NodeOutput(result.plan, out, summary, ui=plan_ui(result.plan, summary))
