"""Window-attention kernels vs dense SDPA, side by side in one process.

For PixArt-Sigma-XL head shapes (16 heads x 72), every window preset Calibrate offers (1D band,
2D box, 3D box; exact and tiled) at N = 1024, 4096, 16384 tokens: images of about sqrt(N) x
sqrt(N) for the 1D and 2D windows, N / 1024 frames of 32 x 32 for the 3D ones. Prints each
available kernel's median time relative to dense SDPA on the same q, k, v (paired runs), next to
the window's FLOPs fraction (keys each query really sees / N) and their ratio: 1.0 means the
kernel is exactly as efficient per FLOP as dense attention.

The comfy-kitchen kernel (na3d, ComfyUI's own kernel library, 0.2.40 or newer) runs the
border-shifted "neighbourhood" presets where it is installed. ``--also`` adds kernels auto never
runs on a CPU, for comparison: FlexAttention unfused (eager) and the dense masked reference.

    python bench/kernels.py                 # the default table (several minutes on 2 cores)
    python bench/kernels.py --sizes 4096 --repeats 7 --flex-compiled
    python bench/kernels.py --sizes 4096 --only "2D box"   # presets whose name contains this
    OMP_NUM_THREADS=1 python bench/kernels.py --sizes 1024 4096 --only "1/8" --also flex-unfused reference
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import paired_ratio, synchronizer  # noqa: E402

from ditfastattn_core.kernels import KERNELS, WindowKernel  # noqa: E402
from ditfastattn_core.kernels.blocked import block_layout_stats  # noqa: E402
from ditfastattn_core.kernels.flex import flex_window_attention  # noqa: E402
from ditfastattn_core.window import PRESETS, TokenLayout, Window, WindowSpec  # noqa: E402

HEADS, HEAD_DIM = 16, 72
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def layout_for(spec: WindowSpec, n: int, text: int = 0) -> TokenLayout:
    """The token layout a preset is timed on at about ``n`` image tokens (plus ``text``
    global tokens first, as in joint attention)."""
    if spec.dims == 3:
        grid = (max(1, n // 1024), 32, 32)
    else:
        side = int(n**0.5)
        grid = (side, n // side)
    return TokenLayout(seq_len=text + grid[0] * grid[1] * (grid[2] if len(grid) > 2 else 1),
                       image_start=text, grid=grid)


def cases(sizes: list[int], only: str = "") -> Iterator[tuple[str, TokenLayout, list[tuple[str, WindowSpec]]]]:
    """(case name, layout, presets timed on it), one layout per size and grid rank."""
    for n in sizes:
        for rank, label in ((2, "image"), (3, "video")):
            specs = [(name, spec) for name, spec in PRESETS.items()
                     if (spec.dims == 3) == (rank == 3) and only in name]
            if specs:
                layout = layout_for(specs[0][1], n)
                yield f"{label} {'x'.join(map(str, layout.grid))}", layout, specs


ALSO = ("flex-unfused", "reference")
"""Kernels auto never runs on a CPU, timed only when asked (``--also``)."""


def _can_run(kernel: WindowKernel, window: Window, q: torch.Tensor) -> bool:
    """Installed, importable (a broken install counts as absent here) and able to express ``window``."""
    if kernel.unsupported(window, q) is not None:
        return False
    try:
        return bool(kernel.available())
    except Exception:
        return False


def kernels_for(window: Window, q: torch.Tensor, flex_compiled: bool = False,
                also: tuple[str, ...] = ()) -> list[tuple[str, Attention]]:
    """The kernels that can run ``window`` on ``q`` here, as (name, fn(q, k, v)). FlexAttention
    is compiled on CUDA (as the engine runs it); eager FlexAttention on CPU is far too slow
    to time by default: compiled on CPU when asked, unfused with ``also``."""
    out = []
    for name in ("blocked", "flash", "flex", "kitchen"):
        kernel = KERNELS[name]
        if not _can_run(kernel, window, q):
            continue
        if name == "flex" and q.device.type != "cuda":
            continue
        out.append((name, functools.partial(_windowed, kernel, window)))
    if flex_compiled and q.device.type == "cpu" and KERNELS["flex"].available():
        out.append(("flex-compiled", functools.partial(_windowed, functools.partial(
            flex_window_attention, compiled=True), window)))
    if "flex-unfused" in also and _can_run(KERNELS["flex"], window, q):
        out.append(("flex-unfused", functools.partial(_windowed, functools.partial(
            flex_window_attention, compiled=False), window)))
    if "reference" in also:
        out.append(("reference", functools.partial(_windowed, KERNELS["reference"], window)))
    return out


def _windowed(kernel, window: Window, q, k, v) -> torch.Tensor:
    return kernel(q, k, v, window)


TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2}
"""Max abs error vs the fp32 reference that a correct kernel stays within (unit-variance
inputs): the low-precision kernels round q, k, v and their output."""


class KernelMismatch(AssertionError):
    """A kernel's output is not the window attention it claims to compute."""


def check_exact(name: str, fn: Attention, window: Window, q, k, v, tol: float) -> float:
    """Max abs error of ``fn`` vs the dense masked reference (in fp32); raises KernelMismatch
    when it exceeds ``tol``. Run it before timing a kernel: a fast wrong kernel is worthless."""
    ref = KERNELS["reference"](q.float(), k.float(), v.float(), window)
    out = fn(q, k, v)
    if out.shape != ref.shape:
        raise KernelMismatch(f"{name} on {window.spec}: output shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    err = float((out.float() - ref).abs().max())
    if not err <= tol:  # also catches NaN
        raise KernelMismatch(f"{name} on {window.spec} (grid {window.grid}): max abs error {err:.3g} > {tol:g}")
    return err


@dataclass(frozen=True)
class Row:
    case: str
    window: str
    kernel: str
    fraction: float
    time_ratio: float
    dense_ms: float
    extra: str = ""

    @property
    def per_flop(self) -> float:
        return self.time_ratio / self.fraction


HEADER = f"{'case':<16} {'window':<54} {'kernel':<14} {'FLOPs frac':>10} {'time/dense':>10} {'time/FLOPs':>10}"


def format_row(r: Row) -> str:
    return (f"{r.case:<16} {r.window:<54} {r.kernel:<14} {r.fraction:>10.3f} {r.time_ratio:>10.3f} "
            f"{r.per_flop:>10.3f}   [dense {r.dense_ms:.0f} ms]{r.extra}")


def bench_case(name: str, layout: TokenLayout, specs, *, repeats: int, dtype: torch.dtype, device: str,
               flex_compiled: bool = False, heads: int = HEADS, head_dim: int = HEAD_DIM,
               check_tol: float | None = None, print_row=print, also: tuple[str, ...] = ()) -> list[Row]:
    """Time every kernel that can run each window against dense SDPA on the same q, k, v;
    with ``check_tol``, first check each kernel against the reference (raises KernelMismatch)."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, layout.seq_len, head_dim, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    sync = synchronizer(device)

    def synced(fn):
        def run():
            fn()
            sync()
        return run

    dense = synced(functools.partial(F.scaled_dot_product_attention, q, k, v))
    dense()
    rows = []
    for label, spec in specs:
        w = spec.bind(layout)
        for kname, fn in kernels_for(w, q, flex_compiled, also):
            extra = ""
            if check_tol is not None:
                extra = f" max err {check_exact(kname, fn, w, q, k, v, check_tol):.1e}"
            t, dense_time = paired_ratio(synced(functools.partial(fn, q, k, v)), dense, repeats)
            if kname == "blocked":
                stats = block_layout_stats(w)
                extra += f" computed {stats['computed_fraction']:.3f}, {stats['sdpa_calls']} calls"
            rows.append(Row(name, label, kname, w.fraction, t, dense_time * 1e3, extra))
            print_row(format_row(rows[-1]))
    return rows


def preamble(device: str, dtype: torch.dtype, repeats: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"threads {torch.get_num_threads()}"
    return (f"torch {torch.__version__}, {device} ({where}), {dtype}, load average {load}, "
            f"{heads} heads x {head_dim}, median of {repeats} paired runs (dense, kernel, dense, kernel, ...)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="time only the presets whose name contains this")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--flex-compiled", action="store_true", help="also time torch.compile'd FlexAttention on CPU")
    ap.add_argument("--check", action="store_true", help="check each kernel against the dense masked reference first")
    ap.add_argument("--also", nargs="*", default=[], choices=ALSO,
                    help="also time kernels auto never runs on a CPU: eager FlexAttention, the dense masked reference")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(preamble(args.device, dtype, args.repeats))
    print(HEADER)
    print("-" * len(HEADER))
    for name, layout, specs in cases(args.sizes, args.only):
        bench_case(name, layout, specs, repeats=args.repeats, dtype=dtype, device=args.device,
                   flex_compiled=args.flex_compiled, check_tol=TOLERANCE[dtype] if args.check else None,
                   also=tuple(args.also))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
