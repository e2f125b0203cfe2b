"""Everything worth measuring on a GPU, in one command (sized to finish within ten minutes on one
H100; not yet run on a GPU).

1. Checks every CUDA window kernel (flash-attn, compiled FlexAttention, comfy-kitchen's na3d
   where comfy-kitchen >= 0.2.40 is installed, blocked) against the dense masked reference on
   every window preset, with and without text tokens, at the given head dim and at 64 (where
   comfy-kitchen runs its fused CUDA kernel; Triton above); stops with exit code 1 at the
   first kernel that is off.
2. The kernel table of bench/kernels.py in bf16 at 4096 and 16384 tokens, 1D, 2D and 3D
   windows, each kernel timed against dense SDPA in the same run (and checked again on the
   timed shapes first), then the kernel auto measures fastest for each preset.
4. With a ComfyUI tree (--comfyui or $COMFYUI_PATH): the Table 2 analog (bench/techniques.py)
   and the whole generation at 2048^2 (bench/end_to_end.py); without one, one line says so.

Without CUDA it prints one line and exits 0.

    python bench/gpu.py [--comfyui ~/ComfyUI] [--head-dim 128 --heads 24] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import (  # noqa: E402
    HEADER,
    TOLERANCE,
    KernelMismatch,
    bench_case,
    cases,
    check_exact,
    kernels_for,
    layout_for,
    preamble,
)

from ditfastattn_core import kernels as window_kernels  # noqa: E402
from ditfastattn_core.window import PRESETS  # noqa: E402

BENCH = Path(__file__).resolve().parent
TEXT_TOKENS = 77
NO_CUDA = "bench/gpu.py: no CUDA device here, nothing to measure (run it on a machine with an NVIDIA GPU)"


def check_all(device: str, dtype: torch.dtype, heads: int, head_dim: int, print_line=print) -> int:
    """Check each kernel that can run each preset on a small layout, with and without text
    tokens; returns
    the number of (kernel, window) pairs checked, raises KernelMismatch at the first wrong one."""
    checked = 0
    g = torch.Generator(device=device).manual_seed(1)
    for label, spec in PRESETS.items():
        for text in (0, TEXT_TOKENS):  # flash-attn runs only without text tokens
            layout = layout_for(spec, 1024, text=text)
            w = spec.bind(layout)
            q, k, v = (torch.randn(2, heads, layout.seq_len, head_dim, generator=g, device=device, dtype=dtype)
                       for _ in range(3))
            for name, fn in kernels_for(w, q):
                err = check_exact(name, fn, w, q, k, v, TOLERANCE[dtype])
                print_line(f"  ok  {name:<8} {label:<40} {text:>3} text tokens  max abs error {err:.1e}")
                checked += 1
    return checked


def auto_choices(device: str, dtype: torch.dtype, heads: int, head_dim: int, n: int, print_line=print) -> dict[str, str]:
    """The kernel auto runs (measured fastest where several can) for each preset on an
    image-only layout of about ``n`` tokens, with every candidate's measured time."""
    chosen = {}
    for label, spec in PRESETS.items():
        w = spec.bind(layout_for(spec, n))
        q = torch.zeros(1, heads, w.layout.seq_len, head_dim, device=device, dtype=dtype)
        chosen[label] = window_kernels.checked_kernel(w, q).name
        ranking = window_kernels._rankings.get((q.device, q.dtype, head_dim, w), ())
        print_line(f"  {label:<52} {chosen[label]:<10} {'measured: ' + ' < '.join(ranking) if ranking else ''}")
    return chosen


def comfy_benchmarks(comfyui: str | None) -> None:
    """Table 2 analog and the 2048^2 generation, each in its own process (they import ComfyUI)."""
    if not comfyui:
        print("\nTable 2 and whole generation: skipped (pass --comfyui or set COMFYUI_PATH)")
        return
    env = {**os.environ, "COMFYUI_PATH": comfyui}
    for script, extra in (("techniques.py", ["--sizes", "1024", "2048", "--device", "cuda"]),
                          ("end_to_end.py", ["--speed", "--size", "2048", "--depth", "1", "--steps", "6", "--delta", "0.15",
                                             "--device", "cuda"])):
        print(f"\n$ python bench/{script} {' '.join(extra)}", flush=True)
        subprocess.run([sys.executable, str(BENCH / script), *extra], env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128,
                    help="128 (Flux, Wan) lets FlexAttention run; 72 is PixArt's (flash or blocked only)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    device, dtype = "cuda", torch.bfloat16
    print(preamble(device, dtype, args.repeats, args.heads, args.head_dim))
    print(f"\n1. every CUDA kernel vs the dense masked reference (1024 image tokens, 0 or {TEXT_TOKENS} text tokens, bf16, "
          f"head dim {args.head_dim} and 64)")
    try:
        n = sum(check_all(device, dtype, args.heads, d) for d in dict.fromkeys((args.head_dim, 64)))
    except KernelMismatch as e:
        print(f"WRONG KERNEL: {e}")
        return 1
    print(f"  {n} kernel/window pairs exact within {TOLERANCE[dtype]:g}")
    print("\n2. kernels vs dense SDPA (bf16)")
    print(HEADER)
    print("-" * len(HEADER))
    for name, layout, specs in cases(args.sizes):
        try:
            bench_case(name, layout, specs, repeats=args.repeats, dtype=dtype, device=device,
                       heads=args.heads, head_dim=args.head_dim, check_tol=TOLERANCE[dtype])
        except KernelMismatch as e:
            print(f"WRONG KERNEL: {e}")
            return 1
    print(f"\n3. the kernel auto runs for each preset at {args.sizes[0]} tokens, bf16 (measured where several can)")
    auto_choices(device, dtype, args.heads, args.head_dim, args.sizes[0])
    comfy_benchmarks(args.comfyui)
    return 0


if __name__ == "__main__":
    sys.exit(main())
