"""Does a plan hold beyond the latents it was calibrated on? On the trained demo model, through
the pack's nodes in real ComfyUI: a plan calibrated (``--mode``, delta ``--level``) on a few
seeds and classes, then applied to other seeds and classes. Per plan: its attention FLOPs, the
error vs FULL of the calibration run's own latents (the Calibrate node's output against a plain
KSampler run of the same inputs), and of the evaluation set (seeds 0.., classes in turn, never
seen in calibration), split into the calibrated classes and the others.

    COMFYUI_PATH=~/comfyui python bench/generalisation.py [--samples 128] [--mode guided] [--level D4]
"""

from __future__ import annotations

import argparse

from demo_eval import DemoEval, flops
from quality import DELTAS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--mode", default="guided")
    ap.add_argument("--level", choices=list(DELTAS), default="D4")
    args = ap.parse_args()
    ev = DemoEval()
    import comfy.sample
    import torch

    from demo_model.comfy_io import empty_latent
    from demo_model.conditioning import NULL, class_conditioning
    from ditfastattn_core import relative_l1
    from ditfastattn_core.comfy_bridge.calibration import ksampler_inputs

    labels = torch.tensor([i % 10 for i in range(args.samples)])
    full = ev.generate(ev.model, labels.tolist())

    def full_of_calibration(classes, samples: int) -> torch.Tensor:
        """FULL on exactly the latents and noise the Calibrate node sampled."""
        latent, noise = ksampler_inputs(ev.model, empty_latent(len(classes)), ev.calibration_seed, samples)
        pos = class_conditioning(ev.emb, list(classes))
        neg = class_conditioning(ev.emb, [NULL] * len(classes))
        return comfy.sample.sample(ev.model, noise, ev.steps, ev.cfg, ev.sampler, ev.scheduler, pos, neg, latent,
                                   seed=ev.calibration_seed, disable_pbar=True)

    delta = DELTAS[args.level]
    print(f"demo model, {args.samples} evaluation samples (seeds 0.., classes in turn), {ev.steps} {ev.sampler} "
          f"steps, cfg {ev.cfg}, window {ev.window}; {args.mode} mode, delta {delta} ({args.level}); calibration "
          f"seeds from {ev.calibration_seed}\n")
    print(f"{'calibrated on':<34} {'FLOPs':>7} {'own inputs':>10} {'eval: seen cls':>14} {'eval: other cls':>15}"
          "  plan")
    setups = [(f"10 classes x {n} seed{'s' if n > 1 else ''} ({10 * n} latents)", tuple(range(10)), n)
              for n in (1, 2, 4, 8)]
    setups += [("classes 0-4 x 1 seed (5 latents)", tuple(range(5)), 1),
               ("class 3 x 1 seed (1 latent)", (3,), 1)]
    for name, classes, samples in setups:
        plan, latent = ev.calibrate(args.mode, delta, classes=classes, samples=samples)
        own = relative_l1(full_of_calibration(classes, samples), latent)
        out = ev.generate(ev.apply(plan), labels.tolist())
        seen = torch.isin(labels, torch.tensor(classes))
        on_seen = relative_l1(full[seen], out[seen])
        on_other = relative_l1(full[~seen], out[~seen]) if (~seen).any() else float("nan")
        print(f"{name:<34} {flops(plan):>7.1%} {own:>10.4f} {on_seen:>14.4f} {on_other:>15.4f}  "
              f"{' '.join(plan.schedule.to_letters())}", flush=True)


if __name__ == "__main__":
    main()
