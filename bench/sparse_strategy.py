"""Plan letter S (Sol-Attn block-sparse attention from comfy-kitchen) on the demo models, through
the pack's nodes in real ComfyUI: the paper's Table 1 columns for plans calibrated with and
without it among the candidates, and the error vs FULL at equal attention FLOPs against the
existing strategies.

1. Table 1: FULL, then per delta a plan calibrated with the default candidates (AST, WA-RS+ASC,
   WA-RS, ASC) and one with Sol-Attn added (``use_sparse``); per row attention FLOPs % of FULL
   (the plan's cost model: Sol-Attn at its kept fraction), rel L1 vs FULL at the same seeds,
   classifier accuracy and the Frechet distances to the real images and to FULL at other seeds,
   with 95% bootstrap intervals (``bench/quality.py``'s measures and interval).
2. Equal FLOPs: Sol-Attn alone at its cheapest (delta 10: every step after the first), then AST,
   WA-RS, ASC alone and all default candidates calibrated to the same attention FLOPs (delta
   searched, ``demo_eval.match_flops``), each plan's rel L1 vs FULL.

Sol-Attn works in 64-token blocks with the diagonal block and its neighbours always exact: on the
digits model (64 image + 4 text tokens = 2 blocks) it computes everything exactly, saves nothing,
and calibration never chooses it (the engine runs such a call dense); on the 256-token models
(``--model image``: 256 image + 4 text tokens = 5 blocks; ``--model video``: 256 tokens = 4
blocks) it keeps about 0.9 of dense attention. On this CPU its kernel is comfy-kitchen's eager
reference (the fused op needs CUDA sm80+, fp16/bf16 and head dim 128), so these are quality
figures, not speed.

    OMP_NUM_THREADS=1 COMFYUI_PATH=~/comfyui python bench/sparse_strategy.py [--model digits|image|video]
        [--samples 128] [--deltas D2 D4 D6] [--mode guided] [--no-equal-flops]
"""

from __future__ import annotations

import argparse
import math
import time

from comfy_setup import import_comfy, load_pack
from demo_eval import match_flops
from quality import DELTAS, bootstrap, register_study_windows

DEFAULT_SWITCHES = {"use_ast": True, "use_wa_rs_asc": True, "use_wa_rs": True, "use_asc": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("digits", "image", "video"), default="digits")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--deltas", nargs="+", choices=list(DELTAS), default=["D2", "D4", "D6"])
    ap.add_argument("--mode", default="guided")
    ap.add_argument("--window", default="band", help="the window of WA-RS (a key of the model's study windows)")
    ap.add_argument("--calibration-seed", type=int, default=10_000)
    ap.add_argument("--resamples", type=int, default=300)
    ap.add_argument("--no-equal-flops", action="store_true")
    args = ap.parse_args()
    import_comfy()
    import torch

    from demo_model.conditioning import NULL, class_conditioning
    from demo_model.data import NUM_CLASSES, load_digits_split
    from demo_model.frechet import FeatureSpace, frechet_distance
    from demo_model.variants import CFG, SAMPLER, SCHEDULER, STEPS, variant
    from ditfastattn_core import Strategy, TokenLayout, relative_l1, sparse

    torch.set_num_threads(1)
    v = variant(args.model)
    pack = load_pack()
    window = register_study_windows(args.model)[args.window]
    model, emb, clf = v.load(), v.load_embeddings(), v.load_classifier()
    train_x, train_y, test_x, test_y = load_digits_split()
    space = FeatureSpace(clf, v.real_set(train_x, train_y)[0])
    real = space(v.real_set(test_x, test_y, seed=1)[0])
    labels = torch.tensor([i % NUM_CLASSES for i in range(args.samples)])
    batches = math.ceil(args.samples / args.batch)

    def generate(m, first_seed: int = 0) -> torch.Tensor:
        return torch.cat([v.sample(m, emb, labels[i:i + args.batch].tolist(), seed=first_seed + i // args.batch)
                          for i in range(0, args.samples, args.batch)])

    cal_pos = class_conditioning(emb, list(range(NUM_CLASSES)))
    cal_neg = class_conditioning(emb, [NULL] * NUM_CLASSES)

    cal_time: dict[int, float] = {}

    def calibrate(delta: float, **use: bool):
        t0 = time.perf_counter()
        plan, _, _ = pack["DiTFastAttn_Calibrate"].execute(
            model, cal_pos, cal_neg, v.empty_latent(NUM_CLASSES), args.calibration_seed, STEPS, CFG, SAMPLER,
            SCHEDULER, 1.0, delta, args.mode, window=window, samples=1, window_kernel="auto", **use).result
        cal_time[id(plan)] = time.perf_counter() - t0
        return plan

    def apply(plan):
        return pack["DiTFastAttn_Apply"].execute(model, plan, "auto", "strict").result[0]

    t0 = time.perf_counter()
    full = generate(model)
    full_time = time.perf_counter() - t0
    full_images = v.latent_to_image(full)
    full_other = space(v.latent_to_image(generate(model, first_seed=batches)))

    grid = v.grid if v.grid[0] > 1 else v.grid[1:]
    text = 4 if v.family == "SD3" else 0
    layout = TokenLayout(seq_len=math.prod(grid) + text, image_start=text, grid=grid)
    print(f"demo model {v.name} ({v.description}); {args.samples} samples, {STEPS} {SAMPLER} steps ({SCHEDULER}), "
          f"cfg {CFG}; {args.mode} mode, window {window}; calibration on {NUM_CLASSES} latents, seed "
          f"{args.calibration_seed}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); FULL generation "
          f"{full_time:.0f} s; comfy-kitchen sol_attn {'available' if sparse.available() else 'NOT available'}")
    print(f"attention call: {layout.seq_len} tokens = {sparse.arrange(layout).blocks} Sol-Attn blocks, sinks "
          f"{sparse.arrange(layout).sinks}; Sol-Attn keeps {sparse.keep_fraction(layout):.1%} of dense "
          f"({'saves' if sparse.saves(layout) else 'saves nothing: runs dense, never chosen'}; the image tokens "
          f"alone would be {sparse.keep_fraction(TokenLayout.image_only(grid)):.1%})\n")

    def scores(name: str, plan, latents: torch.Tensor) -> None:
        images = v.latent_to_image(latents)
        feats = space(images)
        with torch.no_grad():
            correct = (clf.predict(images) == labels).numpy()
        acc_ci = bootstrap(lambda i: correct[i].mean(), len(correct), args.resamples)
        fds = []
        for ref in (real, full_other):
            lo, hi = bootstrap(lambda i, ref=ref: frechet_distance(feats[i], ref), len(feats), args.resamples)
            fds.append(f"{frechet_distance(feats, ref):.2f} [{lo:.2f},{hi:.2f}]")
        mse = ((images - full_images) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
        psnr = (10 * torch.log10(1.0 / mse)).mean().item() if latents is not full else math.inf
        flops = plan.cost().attention_flops if plan is not None else 1.0
        counts = plan.schedule.counts() if plan is not None else {}
        letters = " ".join(plan.schedule.to_letters()) if plan is not None else ""
        cal = f"{cal_time[id(plan)]:.0f}s" if plan is not None else ""
        print(f"{name:<14} {flops:>7.1%} {relative_l1(full, latents):>7.4f} {psnr:>6.1f} "
              f"{correct.mean():.3f} [{acc_ci[0]:.3f},{acc_ci[1]:.3f}] {fds[0]:>22} {fds[1]:>22} "
              f"{counts.get(Strategy.SPARSE, 0):>4} {cal:>5}  {letters}", flush=True)
    head = (f"{'config':<14} {'FLOPs':>7} {'rel L1':>7} {'PSNR':>6} {'accuracy [95% CI]':>21} {'FD real [95% CI]':>22} "
            f"{'FD FULL [95% CI]':>22} {'#S':>4} {'calib':>5}  plan")
    print("1. Table 1, with and without Sol-Attn among the candidates")
    print(head)
    print("-" * len(head))
    scores("FULL", None, full)
    for d in args.deltas:
        for tag, use in (("", DEFAULT_SWITCHES), (" +S", {**DEFAULT_SWITCHES, "use_sparse": True})):
            plan = calibrate(DELTAS[d], **use)
            scores(f"{d}{tag}", plan, generate(apply(plan)))

    if args.no_equal_flops:
        return
    print("\n2. Equal attention FLOPs: Sol-Attn alone at its cheapest, the others calibrated to its FLOPs")
    print(f"{'strategies':<22} {'delta':>7} {'FLOPs':>7} {'rel L1':>7}  plan")
    only = {k: False for k in DEFAULT_SWITCHES}
    s_plan = calibrate(10.0, **only, use_sparse=True)
    target = s_plan.cost().attention_flops

    def show(name: str, plan, delta: float) -> None:
        err = relative_l1(full, generate(apply(plan)))
        print(f"{name:<22} {delta:>7.4f} {plan.cost().attention_flops:>7.1%} {err:>7.4f}  "
              f"{' '.join(plan.schedule.to_letters())}", flush=True)

    show("Sol-Attn alone", s_plan, 10.0)
    if target >= 0.999:
        print("(Sol-Attn saves nothing on this model: nothing to compare at equal FLOPs)")
        return
    for name, switches in (("AST alone", {**only, "use_ast": True}), ("WA-RS alone", {**only, "use_wa_rs": True}),
                           ("ASC alone", {**only, "use_asc": True}), ("default candidates", DEFAULT_SWITCHES),
                           ("default + Sol-Attn", {**DEFAULT_SWITCHES, "use_sparse": True})):
        plan, delta = match_flops(lambda d, s=switches: calibrate(d, **s), target, tries=10)
        show(name, plan, delta)


if __name__ == "__main__":
    main()
