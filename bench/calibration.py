"""Calibration cost in units of one plain generation with the same settings, for every mode
(guided, the default; fast; paper), and each mode's choices against paper mode's (agreement,
FLOPs, end error) at equal delta.

PixArt-Sigma-XL's width at reduced depth with random weights in real ComfyUI (cost does not
depend on the values). Paper mode's cost grows with depth (up to 2 + 4L forwards per step), so
the table also gives its forward count per step and the same count at PixArt's full depth 28.

    COMFYUI_PATH=~/comfyui python bench/calibration.py [--size 1024] [--steps 5] [--depth 2]
        [--modes guided fast paper]

(Random weights make the agreement and error columns a consistency check only; the modes'
quality is measured on the trained demo model by bench/calibration_quality.py.)
"""

from __future__ import annotations

import argparse
import time

from comfy_setup import import_comfy, pixart_sigma_xl, text_cond
from timing import median_time

from ditfastattn_core.calibrate import MODES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = ap.parse_args()
    import_comfy()
    import comfy.patcher_extension
    import comfy.sample
    import torch

    from ditfastattn_core import WindowSpec, relative_l1
    from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

    model = pixart_sigma_xl(args.depth)
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    pos, neg = text_cond(1), text_cond(2)
    noise = comfy.sample.prepare_noise(latent, 0)

    calls = []

    def count(executor, *a, **kw):
        calls.append(1)
        return executor(*a, **kw)

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_count", count)

    def generate():
        return comfy.sample.sample(counted, noise, args.steps, 4.5, "euler", "normal", pos, neg, latent,
                                   seed=0, disable_pbar=True)

    plain = generate()
    gen = median_time(generate, args.repeats, warmup=0)
    calls.clear()
    generate()
    gen_calls = len(calls)

    rows = {}
    for mode in args.modes:
        req = CalibrationRequest(seed=0, steps=args.steps, cfg=4.5, sampler_name="euler", scheduler="normal",
                                 delta=args.delta, mode=mode, window=WindowSpec(tile=(256,)))
        calls.clear()
        t0 = time.perf_counter()
        result = calibrate(counted, pos, neg, {"samples": latent}, req)
        rows[mode] = (time.perf_counter() - t0, len(calls), result)

    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, PixArt-Sigma-XL width, depth "
          f"{args.depth}, {args.size}x{args.size} ({(args.size // 16) ** 2} tokens), {args.steps} euler steps, "
          f"cfg 4.5, delta {args.delta}")
    print(f"one plain generation: {gen:.1f} s ({gen_calls} model calls)\n")
    head = f"{'mode':<6} {'time':>8} {'generations':>12} {'model calls':>12} {'attn FLOPs':>10} {'end error':>10}  plan"
    print(head)
    print("-" * len(head))
    for mode, (t, n, result) in rows.items():
        err = relative_l1(plain, result.samples)
        print(f"{mode:<6} {t:>7.1f}s {t / gen:>12.2f} {n:>12} {result.plan.cost().attention_flops:>10.1%} "
              f"{err:>10.4f}  {' '.join(result.plan.schedule.to_letters())}")
    if "paper" in rows:
        paper = rows["paper"][2].plan.schedule
        for mode in (m for m in rows if m != "paper"):
            plan = rows[mode][2].plan.schedule
            same = sum(a is b for ra, rb in zip(plan.rows, paper.rows, strict=True)
                       for a, b in zip(ra, rb, strict=True))
            total = plan.steps * plan.layers
            print(f"\n{mode} vs paper: {same}/{total} (step, layer) choices agree ({same / total:.0%})")
        per_step = (rows["paper"][1] - 1) / max(1, args.steps - 1)
        print(f"paper mode: {per_step:.1f} forwards per step here (at most 2 + 4L = {2 + 4 * args.depth}); "
              f"at PixArt-Sigma's depth 28 that bound is {2 + 4 * 28} forwards per step, i.e. up to "
              f"{(2 + 4 * 28) * (args.steps - 1) / args.steps + 1 / args.steps:.0f} generations")


if __name__ == "__main__":
    main()
