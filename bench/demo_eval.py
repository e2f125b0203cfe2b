"""What the demo-model benchmarks share: the model and the pack's nodes loaded in real ComfyUI,
sampling an evaluation set, calibrating through the Calibrate node, the error of a plan's
samples vs FULL, and a delta search that matches a target of attention FLOPs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from comfy_setup import import_comfy
from quality import WINDOWS, load_pack


class DemoEval:
    """The demo model in ComfyUI, the pack's nodes, and the sampler settings of the demo."""

    def __init__(self, window: str = "band", calibration_seed: int = 10_000, batch: int = 64) -> None:
        import_comfy()
        import torch

        from demo_model import CLASS_EMBEDDINGS_FILE
        from demo_model.comfy_io import CFG, SAMPLER, SCHEDULER, STEPS, load_demo_dit
        from demo_model.conditioning import load_class_embeddings

        torch.set_num_threads(1)
        self.pack = load_pack()
        self.model = load_demo_dit()
        self.emb = load_class_embeddings(CLASS_EMBEDDINGS_FILE)
        self.window, self.calibration_seed, self.batch = WINDOWS[window], calibration_seed, batch
        self.cfg, self.sampler, self.scheduler, self.steps = CFG, SAMPLER, SCHEDULER, STEPS

    def generate(self, model, labels: Sequence[int], first_seed: int = 0, steps: int | None = None):
        """KSampler over ``labels`` in batches; batch i uses seed ``first_seed + i``."""
        import torch

        from demo_model.comfy_io import sample_classes

        return torch.cat([
            sample_classes(model, self.emb, list(labels[i:i + self.batch]), seed=first_seed + i // self.batch,
                           steps=steps or self.steps)
            for i in range(0, len(labels), self.batch)])

    def calibrate(self, mode: str, delta: float, classes: Sequence[int] = tuple(range(10)), samples: int = 1,
                  steps: int | None = None, seed: int | None = None, **use: bool):
        """A plan from the Calibrate node on one latent per class of ``classes`` (x ``samples``
        seeds), and the latent it produced."""
        from demo_model.comfy_io import empty_latent
        from demo_model.conditioning import NULL, class_conditioning

        pos = class_conditioning(self.emb, list(classes))
        neg = class_conditioning(self.emb, [NULL] * len(classes))
        plan, latent, _ = self.pack["DiTFastAttn_Calibrate"].execute(
            self.model, pos, neg, empty_latent(len(classes)), self.calibration_seed if seed is None else seed,
            steps or self.steps, self.cfg, self.sampler, self.scheduler, 1.0, delta, mode, window=self.window,
            samples=samples, window_kernel="auto", **use).result
        return plan, latent["samples"]

    def apply(self, plan):
        return self.pack["DiTFastAttn_Apply"].execute(self.model, plan, "auto", "strict").result[0]


def flops(plan) -> float:
    return plan.cost().attention_flops


def match_flops(calibrate: Callable[[float], object], target: float, tolerance: float = 0.02, tries: int = 14):
    """The plan ``calibrate(delta)`` whose FLOPs are closest to ``target`` (bisection on log
    delta in [1e-3, 10]; FLOPs fall as delta grows), and its delta."""
    lo, hi = math.log(1e-3), math.log(10.0)
    best = None
    for _ in range(tries):
        delta = math.exp((lo + hi) / 2)
        plan = calibrate(delta)
        if best is None or abs(flops(plan) - target) < abs(flops(best[0]) - target):
            best = (plan, delta)
        if abs(flops(plan) - target) <= tolerance / 2:
            break
        lo, hi = (math.log(delta), hi) if flops(plan) > target else (lo, math.log(delta))
    return best
