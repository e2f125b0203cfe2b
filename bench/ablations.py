"""The paper's Figure 9 ablations on the trained demo model, at matched attention FLOPs, through
the pack's nodes in real ComfyUI (calibration mode ``--mode``, the Calibrate node's default).

1. WA without the residual vs WA-RS: candidates WA_RS only vs WA only (the strategy table's
   ablation row, letter A, which the Calibrate node's execute takes from Python but does not show).
   Delta is searched so both plans cost ``--target``.
2. Each technique alone vs combined (the Calibrate node's use_* switches), each at ``--target``.
3. 20 / 50 / 100 steps: paper and guided mode at the same delta (D4), error vs FULL at that
   step count.

    COMFYUI_PATH=~/comfyui python bench/ablations.py [--samples 128] [--target 0.75]
"""

from __future__ import annotations

import argparse

from demo_eval import DemoEval, flops, match_flops
from quality import DELTAS

SWITCHES = ("use_ast", "use_wa_rs", "use_asc", "use_wa_rs_asc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--mode", default="guided")
    ap.add_argument("--target", type=float, default=0.75, help="attention FLOPs to match, fraction of FULL")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    args = ap.parse_args()
    ev = DemoEval()
    from ditfastattn_core import relative_l1

    labels = [i % 10 for i in range(args.samples)]
    full = ev.generate(ev.model, labels)

    def error(plan) -> float:
        return relative_l1(full, ev.generate(ev.apply(plan), labels))

    def row(name: str, plan, delta: float, err: float) -> None:
        print(f"{name:<28} {delta:>7.4f} {flops(plan):>7.1%} {err:>7.4f}  {' '.join(plan.schedule.to_letters())}",
              flush=True)

    print(f"demo model, {args.samples} samples, {ev.steps} {ev.sampler} steps, cfg {ev.cfg}, window {ev.window}; "
          f"mode {args.mode}; target {args.target:.0%} attention FLOPs\n")
    print(f"{'1. window attention':<28} {'delta':>7} {'FLOPs':>7} {'rel L1':>7}  plan")
    for name, switch in (("WA-RS", "use_wa_rs"), ("WA without residual", "use_wa")):
        only = {s: s == switch for s in (*SWITCHES, "use_wa")}
        plan, delta = match_flops(lambda d, only=only: ev.calibrate(args.mode, d, **only)[0], args.target)
        row(name, plan, delta, error(plan))

    print(f"\n{'2. techniques':<28} {'delta':>7} {'FLOPs':>7} {'rel L1':>7}  plan")
    subsets = {"AST alone": ("use_ast",), "WA-RS alone": ("use_wa_rs",), "ASC alone": ("use_asc",),
               "all (AST, WA-RS, ASC, both)": SWITCHES}
    for name, on in subsets.items():
        use = {s: s in on for s in SWITCHES}
        plan, delta = match_flops(lambda d, u=use: ev.calibrate(args.mode, d, **u)[0], args.target)
        row(name, plan, delta, error(plan))

    print(f"\n{'3. steps (delta D4)':<28} {'delta':>7} {'FLOPs':>7} {'rel L1':>7}")
    for steps in args.steps:
        full_n = ev.generate(ev.model, labels, steps=steps)
        for mode in ("paper", args.mode):
            plan, _ = ev.calibrate(mode, DELTAS["D4"], steps=steps)
            err = relative_l1(full_n, ev.generate(ev.apply(plan), labels, steps=steps))
            print(f"{f'{steps} steps, {mode}':<28} {DELTAS['D4']:>7.4f} {flops(plan):>7.1%} {err:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
