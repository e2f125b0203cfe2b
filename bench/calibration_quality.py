"""Calibration modes judged on the trained demo model, through the pack's nodes in real ComfyUI.

1. Each mode at equal attention FLOPs: paper mode (the 1D band, Algorithm 1) at delta D2, D4,
   D6 sets the FLOPs; for the other modes a delta is searched (bisection on log delta) until
   their plan's FLOPs are within ``--tolerance`` of paper mode's; then the error vs FULL of the
   final samples (mean relative L1 over the evaluation set, same seeds) and its ratio to paper
   mode's.
2. Fast and guided vs paper mode at equal delta: the share of (step, layer) choices that
   agree with paper mode's, FLOPs and end error.
3. Calibration cost in plain generations of the calibration batch (medians of interleaved
   repeats; the load average is printed, as the machine may be shared).

    COMFYUI_PATH=~/comfyui python bench/calibration_quality.py [--samples 256] [--levels D2 D4 D6]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

from comfy_setup import import_comfy
from quality import DELTAS, WINDOWS, load_pack

MODES = ("paper", "fast", "guided")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="evaluation samples (classes in turn)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--levels", nargs="+", choices=list(DELTAS), default=["D2", "D4", "D6"])
    ap.add_argument("--window", choices=list(WINDOWS), default="band")
    ap.add_argument("--calibration-seed", type=int, default=10_000)
    ap.add_argument("--tolerance", type=float, default=0.02, help="FLOPs match, as a fraction of FULL")
    ap.add_argument("--cost-repeats", type=int, default=3)
    args = ap.parse_args()
    import_comfy()
    import torch

    import nodes
    from demo_model import CLASS_EMBEDDINGS_FILE
    from demo_model.comfy_io import (
        CFG,
        SAMPLER,
        SCHEDULER,
        STEPS,
        empty_latent,
        load_demo_dit,
        sample_classes,
    )
    from demo_model.conditioning import NULL, class_conditioning, load_class_embeddings
    from demo_model.data import NUM_CLASSES
    from ditfastattn_core import relative_l1

    torch.set_num_threads(1)
    pack = load_pack()
    model = load_demo_dit()
    emb = load_class_embeddings(CLASS_EMBEDDINGS_FILE)
    labels = [i % NUM_CLASSES for i in range(args.samples)]
    cal_pos = class_conditioning(emb, list(range(NUM_CLASSES)))
    cal_neg = class_conditioning(emb, [NULL] * NUM_CLASSES)
    cal_latent = empty_latent(NUM_CLASSES)

    def generate(m) -> torch.Tensor:
        return torch.cat([sample_classes(m, emb, labels[i:i + args.batch], seed=i // args.batch)
                          for i in range(0, args.samples, args.batch)])

    def calibrate(mode: str, delta: float):
        plan, _, _ = pack["DiTFastAttn_Calibrate"].execute(
            model, cal_pos, cal_neg, cal_latent, args.calibration_seed, STEPS, CFG, SAMPLER, SCHEDULER, 1.0,
            delta, mode, window=WINDOWS[args.window], samples=1, window_kernel="auto").result
        return plan

    full = generate(model)
    errors: dict = {}

    def error(plan) -> float:
        key = tuple(plan.schedule.to_letters())
        if key not in errors:
            errors[key] = relative_l1(full, generate(pack["DiTFastAttn_Apply"].execute(model, plan, "auto",
                                                                                          "strict").result[0]))
        return errors[key]

    def flops(plan) -> float:
        return plan.cost().attention_flops

    def match(mode: str, target: float):
        """The plan of ``mode`` whose FLOPs are closest to ``target`` (bisection on log delta;
        FLOPs fall as delta grows), and its delta."""
        lo, hi = math.log(1e-3), math.log(10.0)
        best = None
        for _ in range(14):
            delta = math.exp((lo + hi) / 2)
            plan = calibrate(mode, delta)
            if best is None or abs(flops(plan) - target) < abs(flops(best[0]) - target):
                best = (plan, delta)
            if abs(flops(plan) - target) <= args.tolerance / 2:
                break
            lo, hi = (math.log(delta), hi) if flops(plan) > target else (lo, math.log(delta))
        return best

    print(f"demo model, {args.samples} samples (seeds 0..{(args.samples - 1) // args.batch} x {args.batch}), "
          f"{STEPS} {SAMPLER} steps, cfg {CFG}; window {WINDOWS[args.window]}; calibration on {NUM_CLASSES} "
          f"latents (one per class), seed {args.calibration_seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread\n")
    print("1. Equal attention FLOPs (paper mode's at each level)")
    print(f"{'level':<6} {'mode':<7} {'delta':>7} {'FLOPs':>7} {'rel L1':>7} {'vs paper':>8}  plan")
    paper_plans = {}
    for level in args.levels:
        paper = paper_plans[level] = calibrate("paper", DELTAS[level])
        p_err = error(paper)
        print(f"{level:<6} {'paper':<7} {DELTAS[level]:>7.4f} {flops(paper):>7.1%} {p_err:>7.4f} {1:>8.2f}  "
              f"{' '.join(paper.schedule.to_letters())}", flush=True)
        for mode in MODES[1:]:
            plan, delta = match(mode, flops(paper))
            err = error(plan)
            print(f"{'':<6} {mode:<7} {delta:>7.4f} {flops(plan):>7.1%} {err:>7.4f} {err / p_err:>8.2f}  "
                  f"{' '.join(plan.schedule.to_letters())}", flush=True)

    print("\n2. Equal delta: agreement with paper mode's choices")
    print(f"{'level':<6} {'mode':<7} {'agree':>6} {'FLOPs':>7} {'rel L1':>7}")
    for level in args.levels:
        paper = paper_plans[level]
        print(f"{level:<6} {'paper':<7} {'':>6} {flops(paper):>7.1%} {error(paper):>7.4f}")
        for mode in MODES[1:]:
            plan = calibrate(mode, DELTAS[level])
            cells = [(a, b) for ra, rb in zip(paper.schedule.rows, plan.schedule.rows, strict=True)
                     for a, b in zip(ra, rb, strict=True)]
            agree = sum(a is b for a, b in cells) / len(cells)
            print(f"{'':<6} {mode:<7} {agree:>6.0%} {flops(plan):>7.1%} {error(plan):>7.4f}", flush=True)

    print("\n3. Calibration cost in plain generations of the calibration batch (delta D4)")
    times: dict[str, list[float]] = {m: [] for m in ("plain", *MODES)}

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def plain() -> None:
        nodes.KSampler().sample(model, args.calibration_seed, STEPS, CFG, SAMPLER, SCHEDULER, cal_pos, cal_neg,
                                cal_latent)

    loads = [os.getloadavg()[0]]
    for _ in range(args.cost_repeats):
        times["plain"].append(timed(plain))
        for mode in MODES:
            times[mode].append(timed(lambda m=mode: calibrate(m, DELTAS["D4"])))
        times["plain"].append(timed(plain))
        loads.append(os.getloadavg()[0])
    base = statistics.median(times["plain"])
    for mode in MODES:
        print(f"{mode:<7} {statistics.median(times[mode]) / base:>5.2f} generations "
              f"(median of {args.cost_repeats}; plain generation {base:.2f} s)")
    print(f"1-min load average during the timing: {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
