"""Calibrate -> save -> load -> apply -> generate, end to end, on a built-in model with no
downloads: PixArt-Sigma-XL's architecture (random weights, reduced depth) in real ComfyUI.

Prints the plan summary, the speedup of the compressed generation over the plain one (same
seed, same settings, measured in this process) and the error of its output vs the plain one.

    COMFYUI_PATH=~/comfyui python bench/end_to_end.py [--size 1024] [--steps 8] [--delta 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from comfy_setup import import_comfy, pixart_sigma_xl, text_cond


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--mode", default="fast", choices=["fast", "paper"])
    ap.add_argument("--tile", type=int, default=256, help="window tile (0: the paper's exact band)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    import_comfy(args.device)
    import comfy.sample
    import torch

    from ditfastattn_core import WindowSpec, relative_l1
    from ditfastattn_core.comfy_bridge import apply_fastattn
    from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate
    from ditfastattn_core.plan_files import read_plan, save_plan

    model = pixart_sigma_xl(args.depth)
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    pos, neg = text_cond(1), text_cond(2)
    window = WindowSpec(tile=(args.tile,)) if args.tile else WindowSpec()

    print(f"1. calibrate ({args.mode} mode, delta {args.delta}) on seed 0 ...", flush=True)
    t0 = time.perf_counter()
    request = CalibrationRequest(seed=0, steps=args.steps, cfg=4.5, sampler_name="euler", scheduler="normal",
                                 delta=args.delta, mode=args.mode, window=window)
    result = calibrate(model, pos, neg, {"samples": latent}, request)
    print(f"   {time.perf_counter() - t0:.1f} s: {result.summary()}")

    with tempfile.TemporaryDirectory() as folder:
        path = save_plan(result.plan, folder, "end_to_end")
        print(f"2. saved {path.name} ({path.stat().st_size} bytes)")
        plan = read_plan(path)
        print(f"3. loaded it back: {'identical' if plan == result.plan else 'DIFFERENT'}")

    patched = apply_fastattn(model, plan)
    print("4. applied; 5. generating seed 1 with and without the plan ...", flush=True)
    noise = comfy.sample.prepare_noise(latent, 1)

    def generate(m):
        t = time.perf_counter()
        out = comfy.sample.sample(m, noise, args.steps, 4.5, "euler", "normal", pos, neg, latent,
                                  seed=1, disable_pbar=True)
        return out, time.perf_counter() - t

    generate(patched)  # warm-up: builds the window layout once
    plain, t_plain = generate(model)
    fast, t_fast = generate(patched)
    print(f"\nplan: {plan.cost().describe()}")
    print(f"plain generation {t_plain:.1f} s, with FastAttn {t_fast:.1f} s: speedup {t_plain / t_fast:.2f}x")
    print(f"error vs FULL (mean relative L1 of the output latent): {relative_l1(plain, fast):.4f}")


if __name__ == "__main__":
    main()
