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
        [--parts 1 2 3] [--cost-repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from demo_eval import DemoEval, flops, match_flops
from quality import DELTAS, WINDOWS

MODES = ("paper", "fast", "guided")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="evaluation samples (classes in turn)")
    ap.add_argument("--levels", nargs="+", choices=list(DELTAS), default=["D2", "D4", "D6"])
    ap.add_argument("--window", choices=list(WINDOWS), default="band")
    ap.add_argument("--tolerance", type=float, default=0.02, help="FLOPs match, as a fraction of FULL")
    ap.add_argument("--cost-repeats", type=int, default=3)
    ap.add_argument("--parts", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3])
    args = ap.parse_args()
    ev = DemoEval(window=args.window)
    import torch

    from ditfastattn_core import relative_l1

    labels = [i % 10 for i in range(args.samples)]
    full = ev.generate(ev.model, labels) if {1, 2} & set(args.parts) else None
    errors: dict = {}

    def calibrate(mode: str, delta: float):
        return ev.calibrate(mode, delta)[0]

    def error(plan) -> float:
        key = tuple(plan.schedule.to_letters())
        if key not in errors:
            errors[key] = relative_l1(full, ev.generate(ev.apply(plan), labels))
        return errors[key]

    print(f"demo model, {args.samples} samples (seeds 0..{(args.samples - 1) // ev.batch} x {ev.batch}), "
          f"{ev.steps} {ev.sampler} steps, cfg {ev.cfg}; window {ev.window}; calibration on 10 latents (one per "
          f"class), seed {ev.calibration_seed}; torch {torch.__version__}, {torch.get_num_threads()} thread\n")
    paper_plans = {level: calibrate("paper", DELTAS[level]) for level in args.levels} if full is not None else {}
    if 1 in args.parts:
        equal_flops(args, paper_plans, calibrate, error)
    if 2 in args.parts:
        equal_delta(args, paper_plans, calibrate, error)
    if 3 in args.parts:
        cost(args, ev, calibrate)


def equal_flops(args, paper_plans: dict, calibrate, error) -> None:
    print("1. Equal attention FLOPs (paper mode's at each level)")
    print(f"{'level':<6} {'mode':<7} {'delta':>7} {'FLOPs':>7} {'rel L1':>7} {'vs paper':>8}  plan")
    for level in args.levels:
        paper = paper_plans[level]
        p_err = error(paper)
        print(f"{level:<6} {'paper':<7} {DELTAS[level]:>7.4f} {flops(paper):>7.1%} {p_err:>7.4f} {1:>8.2f}  "
              f"{' '.join(paper.schedule.to_letters())}", flush=True)
        for mode in MODES[1:]:
            plan, delta = match_flops(lambda d, m=mode: calibrate(m, d), flops(paper), args.tolerance)
            err = error(plan)
            print(f"{'':<6} {mode:<7} {delta:>7.4f} {flops(plan):>7.1%} {err:>7.4f} {err / p_err:>8.2f}  "
                  f"{' '.join(plan.schedule.to_letters())}", flush=True)



def equal_delta(args, paper_plans: dict, calibrate, error) -> None:
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


def cost(args, ev: DemoEval, calibrate) -> None:
    import nodes
    from demo_model.comfy_io import empty_latent
    from demo_model.conditioning import NULL, class_conditioning

    print("\n3. Calibration cost in plain generations of the calibration batch (delta D4)")
    times: dict[str, list[float]] = {m: [] for m in ("plain", *MODES)}
    pos = class_conditioning(ev.emb, list(range(10)))
    neg = class_conditioning(ev.emb, [NULL] * 10)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def plain() -> None:
        nodes.KSampler().sample(ev.model, ev.calibration_seed, ev.steps, ev.cfg, ev.sampler, ev.scheduler, pos, neg,
                                empty_latent(10))

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
