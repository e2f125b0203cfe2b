"""Window-attention kernels vs dense SDPA, side by side in one process.

For PixArt-Sigma-XL head shapes (16 heads x 72) at N = 1024, 4096, 16384 image tokens and a
video-like 3D grid, prints each available kernel's median time relative to dense SDPA on the
same q, k, v, next to the window's FLOPs fraction (keys each query really sees / N), and their
ratio: 1.0 means the kernel is exactly as efficient per FLOP as dense attention.

    python bench/kernels.py                 # the default table (a few minutes on 2 cores)
    python bench/kernels.py --sizes 4096 --repeats 7 --flex-compiled
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import paired_ratio  # noqa: E402

from ditfastattn_core.kernels import KERNELS  # noqa: E402
from ditfastattn_core.kernels.blocked import block_layout_stats  # noqa: E402
from ditfastattn_core.kernels.flex import flex_window_attention  # noqa: E402
from ditfastattn_core.window import TokenLayout, WindowSpec  # noqa: E402

HEADS, HEAD_DIM = 16, 72


def cases(sizes: list[int], video: bool):
    for n in sizes:
        side = int(n**0.5)
        layout = TokenLayout.image_only((side, n // side))
        yield f"1D N={n}", layout, [
            ("band N/8 exact", WindowSpec()),
            ("band N/8 tile 256", WindowSpec(tile=(256,))),
            ("band N/8 tile 512", WindowSpec(tile=(512,))),
        ]
    if video:
        grid = (8, 32, 32)  # 8 latent frames of 32x32 tokens: 8192 tokens
        layout = TokenLayout.image_only(grid)
        yield f"3D {grid}", layout, [
            ("box 1/4 exact", WindowSpec(dims=3, extent=(0.25, 0.25, 0.25))),
            ("box 1/4 tile 2x8x16", WindowSpec(dims=3, extent=(0.25, 0.25, 0.25), tile=(2, 8, 16))),
            ("band N/8 tile 256", WindowSpec(tile=(256,))),
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-video", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--flex-compiled", action="store_true", help="also time torch.compile'd FlexAttention")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    print(f"torch {torch.__version__}, {args.device}, {dtype}, threads {torch.get_num_threads()}, "
          f"{HEADS} heads x {HEAD_DIM}, median of {args.repeats} paired runs (dense, kernel, dense, kernel, ...)")
    header = f"{'case':<18} {'window':<22} {'kernel':<14} {'FLOPs frac':>10} {'time/dense':>10} {'time/FLOPs':>10}"
    print(header)
    print("-" * len(header))
    for name, layout, specs in cases(args.sizes, not args.no_video):
        bench_case(name, layout, specs, args, dtype, sync)


def bench_case(name, layout, specs, args, dtype, sync) -> None:
    g = torch.Generator(device=args.device).manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, layout.seq_len, HEAD_DIM, generator=g, device=args.device, dtype=dtype)
               for _ in range(3))

    def synced(fn):
        def run():
            fn()
            sync()
        return run

    dense = synced(functools.partial(F.scaled_dot_product_attention, q, k, v))
    dense()
    print(f"{name:<18} {'(dense SDPA)':<22} {'sdpa':<14} {1.0:>10.3f} {1.0:>10.3f} {1.0:>10.3f}")
    for label, spec in specs:
        w = spec.bind(layout)
        kernels = []
        for kname in ("blocked", "flash", "flex"):
            kern = KERNELS[kname]
            if kern.available() and kern.unsupported(w, q) is None and (args.device == "cuda" or kname == "blocked"):
                kernels.append((kname, functools.partial(kern, q, k, v, w)))
        if args.flex_compiled and args.device == "cpu" and KERNELS["flex"].available():
            kernels.append(("flex-compiled", functools.partial(flex_window_attention, q, k, v, w, compiled=True)))
        for kname, fn in kernels:
            t, dense_time = paired_ratio(synced(fn), dense, args.repeats)
            extra = f"   [dense {dense_time * 1e3:.0f} ms]"
            if kname == "blocked":
                stats = block_layout_stats(w)
                extra += f" computed {stats['computed_fraction']:.3f}, {stats['sdpa_calls']} calls"
            print(f"{'':<18} {label:<22} {kname:<14} {w.fraction:>10.3f} {t:>10.3f} {t / w.fraction:>10.3f}{extra}")
    print()


if __name__ == "__main__":
    main()
