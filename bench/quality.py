"""The paper's Table 1 on the pack's trained demo model, through the pack's nodes in real ComfyUI.

FULL first, then for each window (the paper's 1D band, the 2D box) and calibration mode (paper,
fast, guided) and each threshold D1-D6 (delta 0.025 ... 0.15): calibrate a plan with "Calibrate
FastAttn Plan" on one latent per class (seed ``--calibration-seed``, disjoint from the evaluation
seeds), apply it with "Apply FastAttn" and sample the evaluation set with the core KSampler. Per
row: attention FLOPs % of FULL (the plan's cost model), error vs FULL at the same seeds (the
paper's mean relative L1 on the latents, PSNR of the images), the classifier's accuracy on the
conditioned class, two Frechet distances on the classifier's features (``demo_model.frechet``) and
the mean symmetry error (the data's long-range structure; 0 for real images), with 95% bootstrap
intervals for accuracy and the distances.

FD real: to the held-out real images (the issue's measure; it judges the samples as a whole, the
guidance scale's exaggeration included, not only what compression changed). FD FULL: to FULL's samples at other seeds (the next
``--samples`` seeds), so it charges only what compression changed; FULL's own row gives the floor
that sampling noise alone reaches. ``--full-cfg`` adds FULL rows at other guidance scales,
``--full-seed-sets`` FULL rows at further sets of seeds (how much FULL's FDs vary from one set of
seeds to the next, beside what the bootstrap says).

Each configuration's latents are saved under ``--out``; ``--reuse`` takes them from there
(when saved with the same samples, batch and calibration seed) to recompute the table without
sampling.

    COMFYUI_PATH=~/comfyui python bench/quality.py [--samples 256] [--deltas D1 D2 ...]
        [--modes paper fast guided] [--windows band 2d] [--full-cfg 3 4.5]
        [--full-seed-sets 6] [--reuse]

``--model image`` / ``--model video``: the same table on the 256-token demo models
(demo_model/variants.py) with the window study's windows (``STUDY_WINDOWS``: the 1D band, tiled
band, 2D box, tiled 2D, 3D boxes and tiled 3D, border-shifted boxes, sized to about the paper
band's attention FLOPs on that grid; docs/window_study.md). ``--wa-rs-only`` calibrates with WA-RS
as the only candidate, so that the rows differ by the window alone (with every candidate, AST takes
most (step, layer) slots on these models and the window decides few):

    COMFYUI_PATH=~/comfyui python bench/quality.py --model image --samples 256 --modes guided \
        --deltas D2 D4 D6 [--wa-rs-only]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from comfy_setup import ROOT, import_comfy, load_pack

from ditfastattn_core.calibrate import MODES

DELTAS = {"D1": 0.025, "D2": 0.05, "D3": 0.075, "D4": 0.1, "D5": 0.125, "D6": 0.15}
WINDOWS = {"band": "band 1/8 (paper)", "2d": "2D box 1/8"}

#: The window study's windows per model: key -> (name, WindowSpec arguments). The exact band is the
#: paper's; the others are sized to about its attention FLOPs on that model's token grid (image:
#: 16x16 + 4 text tokens, band 26.1%; video: 4x8x8, band 23.8%), because the pack's presets
#: differ by up to 4x there (and its tiled presets are dense attention: 8x8 tiles on a 16x16 grid).
#: A 3D box on the image grid folds to T = 1 and is the 2D box; a 2D box cannot be laid on a video
#: grid with T > 1 (the pack refuses it), so neither is a row.
STUDY_WINDOWS = {
    "image": {
        "band": ("band 1/8 (paper)", {}),
        "band-tiled": ("study: band 1/8, 8-token tiles", {"tile": (8,)}),
        "2d": ("study: 2D box 1/4 (radius 4)", {"dims": 2, "extent": (0.25, 0.25)}),
        "2d-tiled": ("study: 2D box 1/8, 2x4 tiles", {"dims": 2, "extent": (0.125, 0.125), "tile": (2, 4)}),
        "2d-shift": ("study: 2D neighbourhood radius 4 (na2d)", {"dims": 2, "extent": (0.25, 0.25), "border": "shift"}),
    },
    "video": {
        "band": ("band 1/8 (paper)", {}),
        "band-tiled": ("study: band 1/8, 8-token tiles", {"tile": (8,)}),
        "3d": ("study: 3D box radius 2x2x2", {"dims": 3, "extent": (0.5, 0.25, 0.25)}),
        "3d-t1": ("study: 3D box radius 1x3x3", {"dims": 3, "extent": (0.25, 0.375, 0.375)}),
        "3d-all": ("study: 3D box all frames, radius 2x2", {"dims": 3, "extent": (1.0, 0.25, 0.25)}),
        "3d-tiled": ("study: 3D box radius 1x1x1, 2x1x2 tiles", {"dims": 3, "extent": (0.25, 0.125, 0.125),
                                                                 "tile": (2, 1, 2)}),
        "3d-shift": ("study: 3D neighbourhood radius 2x2x2 (na3d)", {"dims": 3, "extent": (0.5, 0.25, 0.25),
                                                                     "border": "shift"}),
    },
}


def register_study_windows(model: str) -> dict[str, str]:
    """Add the model's study windows to the pack's window presets (every loaded copy of
    ``ditfastattn_core.window``: the pack as ComfyUI loaded it and the bench's import), so the
    Calibrate node accepts them by name; returns key -> name."""
    import sys

    if model == "digits":
        return dict(WINDOWS)
    for module in [m for n, m in list(sys.modules.items()) if n.endswith("ditfastattn_core.window")]:
        for name, spec in STUDY_WINDOWS[model].values():
            module.PRESETS.setdefault(name, module.WindowSpec(**spec))
    return {key: name for key, (name, _) in STUDY_WINDOWS[model].items()}


def bootstrap(stat, n: int, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of ``stat(indices)`` over resamples of n items with replacement: the
    percentile interval moved by the bootstrap's bias (mean of the resampled values minus the point
    value). A Frechet distance of a resample sits above the sample's by about its own estimation
    floor; the move takes that off and keeps the distance's right skew (the reflected "basic"
    interval, 2 s - q, also takes it off but reflects the skew, and on real digits it left out the
    sample's own value). For an accuracy the bias is ~0 and this is the percentile interval."""
    import numpy as np

    rng = np.random.default_rng(seed)
    point = stat(np.arange(n))
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    low, high = np.quantile(values, [0.025, 0.975]) - (values.mean() - point)
    return float(low), float(high)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="evaluation samples (classes in turn)")
    ap.add_argument("--batch", type=int, default=64, help="samples per KSampler run (seed = its index)")
    ap.add_argument("--deltas", nargs="+", choices=list(DELTAS), default=list(DELTAS))
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--model", choices=("digits", "image", "video"), default="digits",
                    help="digits: the 64-token demo; image, video: the 256-token demo models")
    ap.add_argument("--windows", nargs="+", default=None,
                    help=f"digits: {list(WINDOWS)} (default both); image: {list(STUDY_WINDOWS['image'])}; "
                    f"video: {list(STUDY_WINDOWS['video'])} (default all)")
    ap.add_argument("--full-cfg", nargs="*", type=float, default=[], help="FULL rows at these guidance scales too")
    ap.add_argument("--full-seed-sets", type=int, default=0, help="FULL rows at this many further sets of seeds")
    ap.add_argument("--calibration-seed", type=int, default=10_000)
    ap.add_argument("--resamples", type=int, default=500, help="bootstrap resamples")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for each configuration's latents (bench/results/quality[-<model>])")
    ap.add_argument("--wa-rs-only", action="store_true",
                    help="calibrate with WA-RS as the only candidate, so that the rows differ by the window alone")
    ap.add_argument("--reuse", action="store_true", help="take latents saved under --out instead of sampling")
    args = ap.parse_args()
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("quality" if args.model == "digits" else f"quality-{args.model}")
    import_comfy()
    import torch

    from demo_model.conditioning import NULL, class_conditioning
    from demo_model.data import NUM_CLASSES, load_digits_split
    from demo_model.frechet import FeatureSpace, frechet_distance
    from demo_model.variants import CFG, SAMPLER, SCHEDULER, STEPS, variant
    from ditfastattn_core import relative_l1

    torch.set_num_threads(1)
    v = variant(args.model)
    pack = load_pack()
    windows = register_study_windows(args.model)
    args.windows = args.windows or list(windows)
    unknown = [w for w in args.windows if w not in windows]
    if unknown:
        ap.error(f"--windows for --model {args.model}: choose from {list(windows)}, not {unknown}")
    model = v.load()
    emb = v.load_embeddings()
    clf = v.load_classifier()
    train_x, train_y, test_x, test_y = load_digits_split()
    space = FeatureSpace(clf, v.real_set(train_x, train_y, per_digit=3)[0])  # digits: every shift
    real = space(v.real_set(test_x, test_y, seed=1)[0])
    latent_to_image, empty_latent, symmetry_error = v.latent_to_image, v.empty_latent, v.structure_error
    labels = torch.tensor([i % NUM_CLASSES for i in range(args.samples)])
    batches = math.ceil(args.samples / args.batch)

    def generate(m, first_seed: int = 0, cfg: float = CFG) -> torch.Tensor:
        chunks = [v.sample(m, emb, labels[i:i + args.batch].tolist(), seed=first_seed + i // args.batch,
                           cfg=cfg) for i in range(0, args.samples, args.batch)]
        return torch.cat(chunks)

    def saved(name: str, make) -> dict:
        """``make()``'s record (latents and what produced them), saved under --out; with --reuse the
        record saved there by an earlier run with the same settings."""
        path = args.out / f"{name.replace(' ', '_')}.pt"
        key = {"samples": args.samples, "batch": args.batch, "calibration_seed": args.calibration_seed}
        if args.reuse and path.is_file():
            record = torch.load(path, weights_only=True)
            if all(record.get(k) == v for k, v in key.items()):
                return record
        t0 = time.perf_counter()
        record = {**make(), **key, "seconds": time.perf_counter() - t0}
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(record, path)
        return record

    full_record = saved("FULL", lambda: {"latents": generate(model)})
    full = full_record["latents"]
    full_images = latent_to_image(full)
    full_other = space(latent_to_image(saved("FULL other seeds",
                                             lambda: {"latents": generate(model, first_seed=batches)})["latents"]))

    def row(name: str, flops: float, latents: torch.Tensor, same_seeds: bool = True) -> dict:
        """The row's scores; the errors vs FULL only for samples drawn at FULL's seeds."""
        images = latent_to_image(latents)
        feats = space(images)
        with torch.no_grad():
            correct = (clf.predict(images) == labels).numpy()
        rel_l1, psnr = math.nan, math.nan
        if same_seeds:
            mse = ((images - full_images) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
            rel_l1 = relative_l1(full, latents)
            psnr = (10 * torch.log10(1.0 / mse)).mean().item() if latents is not full else math.inf
        return {
            "name": name, "flops": flops, "rel_l1": rel_l1, "psnr": psnr,
            "acc": correct.mean(), "acc_ci": bootstrap(lambda i: correct[i].mean(), len(correct), args.resamples),
            **{f"fd_{ref_name}": frechet_distance(feats, ref) for ref_name, ref in (("real", real), ("full", full_other))},
            **{f"fd_{ref_name}_ci": bootstrap(lambda i, ref=ref: frechet_distance(feats[i], ref), len(feats),
                                              args.resamples)
               for ref_name, ref in (("real", real), ("full", full_other))},
            "sym": symmetry_error(images).mean().item(),
            "n": len(correct),
        }

    print(f"demo model {v.name} ({v.description}), {args.samples} samples, {STEPS} {SAMPLER} steps "
          f"({SCHEDULER}), cfg {CFG}; calibration on {NUM_CLASSES} latents (one per class), seed "
          f"{args.calibration_seed}; FD on {space.axes.shape[1]} principal components of the classifier's "
          f"features, FD FULL against FULL at seeds {batches}-{2 * batches - 1}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; FULL generation {full_record['seconds']:.0f} s; 95% bootstrap "
          f"intervals over {args.resamples} resamples\n")
    for key in args.windows:
        lay = v.grid if v.grid[0] > 1 else v.grid[1:]
        spec = pack_window_spec(windows[key])
        print(f"window {key}: {windows[key]} = {spec}, window attention {window_fraction(spec, v):.1%} of dense "
              f"on the {'x'.join(map(str, lay))} token grid")
    print()
    head = (f"{'config':<16} {'attn FLOPs':>10} {'rel L1':>7} {'PSNR':>6} {'accuracy [95% CI]':>22} "
            f"{'FD real [95% CI]':>22} {'FD FULL [95% CI]':>22} {'symmetry':>8} {'calib.':>6}  "
            "plan (a group per step, a letter per layer)")
    print(head)
    print("-" * len(head))

    def show(r: dict) -> None:
        acc = f"{r['acc']:.3f} [{r['acc_ci'][0]:.3f},{r['acc_ci'][1]:.3f}]"
        fds = [f"{r[k]:.2f} [{r[k + '_ci'][0]:.2f},{r[k + '_ci'][1]:.2f}]" for k in ("fd_real", "fd_full")]
        cal = f"{r['cal_time']:.0f}s" if "cal_time" in r else ""
        print(f"{r['name']:<16} {r['flops']:>10.1%} {r['rel_l1']:>7.4f} {r['psnr']:>6.1f} {acc:>22} {fds[0]:>22} "
              f"{fds[1]:>22} {r['sym']:>8.4f} {cal:>6}  {r.get('plan', '')}", flush=True)

    show(row("FULL", 1.0, full))
    for k in range(2, 2 + args.full_seed_sets):
        seeds = f"seeds {k * batches}-{(k + 1) * batches - 1}"
        show(row(f"FULL {seeds}", 1.0, saved(f"FULL {seeds}",
                                             lambda k=k: {"latents": generate(model, first_seed=k * batches)})["latents"],
                 same_seeds=False))
    for cfg in args.full_cfg:
        show(row(f"FULL cfg {cfg:g}", 1.0,
                 saved(f"FULL cfg {cfg:g}", lambda cfg=cfg: {"latents": generate(model, cfg=cfg)})["latents"]))
    cal_pos = class_conditioning(emb, list(range(NUM_CLASSES)))
    cal_neg = class_conditioning(emb, [NULL] * NUM_CLASSES)
    cal_latent = empty_latent(NUM_CLASSES)

    only = {"use_ast": False, "use_wa_rs_asc": False, "use_wa_rs": True, "use_asc": False} if args.wa_rs_only else {}

    def compressed(window: str, mode: str, d: str) -> dict:
        t0 = time.perf_counter()
        plan, _, _ = pack["DiTFastAttn_Calibrate"].execute(
            model, cal_pos, cal_neg, cal_latent, args.calibration_seed, STEPS, CFG, SAMPLER, SCHEDULER,
            1.0, DELTAS[d], mode, window=window, samples=1, window_kernel="auto", **only).result
        cal_time = time.perf_counter() - t0
        patched = pack["DiTFastAttn_Apply"].execute(model, plan, "auto", "strict").result[0]
        return {"latents": generate(patched), "flops": plan.cost().attention_flops,
                "plan": " ".join(plan.schedule.to_letters()), "cal_time": cal_time}

    for window in args.windows:
        for mode in args.modes:
            for d in args.deltas:
                name = f"{window} {mode} {d}" + (" WA-RS" if args.wa_rs_only else "")
                record = saved(name, lambda window=window, mode=mode, d=d: compressed(windows[window], mode, d))
                r = row(name, record["flops"], record["latents"])
                show({**r, "plan": record["plan"], "cal_time": record["cal_time"]})


def pack_window_spec(name: str):
    from ditfastattn_core.window import PRESETS

    return PRESETS[name]


def window_fraction(spec, v) -> float:
    """Window attention's FLOPs relative to dense attention on the model's token layout (SD3:
    text tokens first and global; Wan: image tokens only, text through cross-attention)."""
    import math

    from ditfastattn_core.window import TokenLayout

    grid = v.grid if v.grid[0] > 1 else v.grid[1:]
    text = 4 if v.family == "SD3" else 0
    return spec.bind(TokenLayout(seq_len=math.prod(grid) + text, image_start=text, grid=grid)).fraction


if __name__ == "__main__":
    main()
