"""The paper's Table 1 on the pack's trained demo model, through the pack's nodes in real ComfyUI.

FULL first, then for each window (the paper's 1D band, the 2D box) and calibration mode (paper,
fast) and each threshold D1-D6 (delta 0.025 ... 0.15): calibrate a plan with "Calibrate FastAttn
Plan" on one latent per class (seed ``--calibration-seed``, disjoint from the evaluation seeds),
apply it with "Apply FastAttn" and sample the evaluation set with the core KSampler. Per row:
attention FLOPs % of FULL (the plan's cost model), error vs FULL at the same seeds (the paper's mean
relative L1 on the latents, PSNR of the images), the classifier's accuracy on the conditioned
class, the Frechet distance of the classifier's features to the held-out real images, and the mean
symmetry error (the data's long-range structure; 0 for real images), with 95% bootstrap intervals
for accuracy and FD.

    COMFYUI_PATH=~/comfyui python bench/quality.py [--samples 256] [--deltas 0.025 0.05 ...]
        [--modes paper fast guided] [--windows band 2d]
"""

from __future__ import annotations

import argparse
import math
import time

from comfy_setup import import_comfy, load_pack

from ditfastattn_core.calibrate import MODES

DELTAS = {"D1": 0.025, "D2": 0.05, "D3": 0.075, "D4": 0.1, "D5": 0.125, "D6": 0.15}
WINDOWS = {"band": "band 1/8 (paper)", "2d": "2D box 1/8"}


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    import numpy as np
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def bootstrap(stat, n: int, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% basic bootstrap interval of ``stat(indices)`` over resamples of n items with replacement:
    (2 s - q97.5, 2 s - q2.5), which also undoes the upward bias that duplicated samples give a
    Frechet distance."""
    import numpy as np

    rng = np.random.default_rng(seed)
    point = stat(np.arange(n))
    values = sorted(stat(rng.integers(0, n, n)) for _ in range(resamples))
    low, high = values[int(0.025 * resamples)], values[min(resamples - 1, int(0.975 * resamples))]
    return 2 * point - high, 2 * point - low


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="evaluation samples (classes in turn)")
    ap.add_argument("--batch", type=int, default=64, help="samples per KSampler run (seed = its index)")
    ap.add_argument("--deltas", nargs="+", choices=list(DELTAS), default=list(DELTAS))
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--windows", nargs="+", choices=list(WINDOWS), default=list(WINDOWS))
    ap.add_argument("--calibration-seed", type=int, default=10_000)
    ap.add_argument("--resamples", type=int, default=500, help="bootstrap resamples")
    args = ap.parse_args()
    import_comfy()
    import torch

    from demo_model import CLASS_EMBEDDINGS_FILE, CLASSIFIER_FILE
    from demo_model.classifier import load_classifier
    from demo_model.comfy_io import (
        CFG,
        SAMPLER,
        SCHEDULER,
        STEPS,
        empty_latent,
        latent_to_image,
        load_demo_dit,
        sample_classes,
    )
    from demo_model.conditioning import NULL, class_conditioning, load_class_embeddings
    from demo_model.data import NUM_CLASSES, load_digits_split, symmetry_error
    from demo_model.train import held_out_images
    from ditfastattn_core import relative_l1

    pack = load_pack()
    model = load_demo_dit()
    emb = load_class_embeddings(CLASS_EMBEDDINGS_FILE)
    clf = load_classifier(CLASSIFIER_FILE)
    _, _, test_x, test_y = load_digits_split()
    with torch.no_grad():
        real = clf.features(held_out_images(test_x, test_y)[0]).numpy().astype("float64")
    labels = torch.tensor([i % NUM_CLASSES for i in range(args.samples)])

    def generate(m) -> torch.Tensor:
        chunks = [sample_classes(m, emb, labels[i:i + args.batch].tolist(), seed=i // args.batch)
                  for i in range(0, args.samples, args.batch)]
        return torch.cat(chunks)

    t0 = time.perf_counter()
    full = generate(model)
    full_time = time.perf_counter() - t0
    full_images = latent_to_image(full)

    def row(name: str, flops: float, latents: torch.Tensor) -> dict:
        images = latent_to_image(latents)
        with torch.no_grad():
            feats = clf.features(images).numpy().astype("float64")
            correct = (clf.head(torch.from_numpy(feats).float()).argmax(1) == labels).numpy()
        mse = ((images - full_images) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        return {
            "name": name, "flops": flops, "rel_l1": relative_l1(full, latents),
            "psnr": (10 * torch.log10(1.0 / mse)).mean().item() if latents is not full else math.inf,
            "acc": correct.mean(), "acc_ci": bootstrap(lambda i: correct[i].mean(), len(correct), args.resamples),
            "fd": frechet_distance(feats, real),
            "fd_ci": bootstrap(lambda i: frechet_distance(feats[i], real), len(feats), args.resamples),
            "sym": symmetry_error(images).mean().item(),
        }

    print(f"demo model (SD3/MMDiT depth 2, 64 image tokens), {args.samples} samples, {STEPS} {SAMPLER} steps "
          f"({SCHEDULER}), cfg {CFG}; calibration on {NUM_CLASSES} latents (one per class), seed "
          f"{args.calibration_seed}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"FULL generation {full_time:.0f} s; 95% bootstrap intervals over {args.resamples} resamples\n")
    head = (f"{'config':<16} {'attn FLOPs':>10} {'rel L1':>7} {'PSNR':>6} {'accuracy [95% CI]':>22} "
            f"{'FD [95% CI]':>22} {'symmetry':>8} {'calib.':>6}  plan (a group per step, a letter per layer)")
    print(head)
    print("-" * len(head))

    def show(r: dict) -> None:
        acc = f"{r['acc']:.3f} [{r['acc_ci'][0]:.3f},{r['acc_ci'][1]:.3f}]"
        fd = f"{r['fd']:.2f} [{r['fd_ci'][0]:.2f},{r['fd_ci'][1]:.2f}]"
        cal = f"{r['cal_time']:.0f}s" if "cal_time" in r else ""
        print(f"{r['name']:<16} {r['flops']:>10.1%} {r['rel_l1']:>7.4f} {r['psnr']:>6.1f} {acc:>22} {fd:>22} "
              f"{r['sym']:>8.4f} {cal:>6}  {r.get('plan', '')}", flush=True)

    show(row("FULL", 1.0, full))
    cal_pos = class_conditioning(emb, list(range(NUM_CLASSES)))
    cal_neg = class_conditioning(emb, [NULL] * NUM_CLASSES)
    cal_latent = empty_latent(NUM_CLASSES)
    for window in args.windows:
        for mode in args.modes:
            for d in args.deltas:
                t0 = time.perf_counter()
                plan, _, _ = pack["DiTFastAttn_Calibrate"].execute(
                    model, cal_pos, cal_neg, cal_latent, args.calibration_seed, STEPS, CFG, SAMPLER, SCHEDULER,
                    1.0, DELTAS[d], mode, window=WINDOWS[window], samples=1, window_kernel="auto").result
                cal_time = time.perf_counter() - t0
                patched = pack["DiTFastAttn_Apply"].execute(model, plan, "auto", "strict").result[0]
                r = row(f"{window} {mode} {d}", plan.cost().attention_flops, generate(patched))
                show({**r, "plan": " ".join(plan.schedule.to_letters()), "cal_time": cal_time})

if __name__ == "__main__":
    main()
