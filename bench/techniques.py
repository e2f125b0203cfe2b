"""The paper's Table 2 on PixArt-Sigma-XL's architecture in real ComfyUI (random weights,
depth reduced: per-layer ratios are what count), at 1024^2 and 2048^2 images.

Per technique (every layer of step 1 uses it, after a FULL step 0):
- attention FLOPs % of FULL (the cost model, the window's true key count);
- attention latency % of FULL: the self-attention op alone (q, k, v -> output through the
  engine, CFG batch of 2, the kernel auto picks), median of repeats;
- their ratio (1.00 = the technique is as efficient per FLOP as dense attention);
- attention-module time % of the unpatched model's (PixArt's self-attention modules, QKV and
  output projections included: where the pack owns the module, AST skips them too);
- model-call time % of the unpatched model (the whole PixArt forward, CFG batch of 2);
- cache memory per layer that the technique needs.
Plus the hook's overhead (an all-FULL plan vs the unpatched model), and the cache memory of a
compressing plan: the peak a sampling run held against the estimate Apply FastAttn states,
with the caches on the compute device and in CPU memory, and what CPU caches cost in time.

    COMFYUI_PATH=~/comfyui python bench/techniques.py [--sizes 1024 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics

from comfy_setup import import_comfy, pixart_sigma_xl, text_cond
from timing import paired_ratio, synchronizer

TECHNIQUES = ["FULL", "ASC", "WA_RS", "WA_RS_ASC", "AST"]


def attention_latency(n_side: int, repeats: int, window):
    """Per technique: (latency relative to FULL, paired; cache bytes), and FULL's time."""
    import comfy.model_management
    import torch
    import torch.nn.functional as F

    from ditfastattn_core import CallContext, RunState, Schedule, Strategy, TokenLayout, attend

    device = comfy.model_management.get_torch_device()
    sync = synchronizer(device)
    tokens = TokenLayout.image_only((n_side, n_side))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, tokens.seq_len, 72, generator=g).to(device) for _ in range(3))
    dense = F.scaled_dot_product_attention
    step1, memory = {}, {}
    for name in TECHNIQUES:
        s = Strategy[name]
        state = RunState(Schedule.from_letters(["F", s.letter]))
        attend(q, k, v, Strategy.FULL, 0, CallContext(0, (1, 0), tokens, window), state, dense=dense)
        memory[name] = state.cache_bytes()
        state.frozen = True  # time step 1 repeatedly on the same caches
        step1[name] = _then(functools.partial(attend, q, k, v, s, 0, CallContext(1, (1, 0), tokens, window),
                                              state, dense=dense), sync)
    out, full_time = {}, None
    for name in TECHNIQUES:
        ratio, full_time = paired_ratio(step1[name], step1["FULL"], repeats)
        out[name] = (ratio, memory[name])
    return out, window.bind(tokens).fraction, full_time


def _then(fn, sync):
    def run():
        fn()
        sync()
    return run


class TimedSampling:
    """PixArt-Sigma-XL width with fixed conditioning, sampled with every model call timed."""

    def __init__(self, latent_side: int, depth: int, steps: int):
        import comfy.samplers
        import torch

        self.base = pixart_sigma_xl(depth)
        self.depth, self.steps = depth, steps
        self.latent = torch.zeros(1, 4, latent_side, latent_side)
        self.pos, self.neg = text_cond(1), text_cond(2)
        model_sampling = self.base.get_model_object("model_sampling")
        self.sigmas = tuple(comfy.samplers.calculate_sigmas(model_sampling, "normal", steps).tolist())

    def plan(self, rows: list[str], window):
        """A plan for this model (with its attention size: PixArt's self-attention covers the image
        tokens only, 1152 wide); ``rows`` holds one letter per layer, a row per step."""
        from ditfastattn_core import AttentionSize, Plan, Schedule

        grid = tuple(s // 2 for s in self.latent.shape[2:])
        return Plan(schedule=Schedule.from_letters(rows), family="pixart", sigmas=self.sigmas, sampler="euler",
                    scheduler="normal", cfg=4.5, window=window, grid=grid,
                    attention=AttentionSize(grid[0] * grid[1], 1152))

    def patched(self, letters: list[str], window, **apply):
        """The base model with a plan of one letter per step on every layer."""
        from ditfastattn_core.comfy_bridge import apply_fastattn

        return apply_fastattn(self.base, self.plan([c * self.depth for c in letters], window), **apply)

    def call_times(self, model, seed: int) -> list[float]:
        """Seconds of each model call of one sampling run."""
        return self.timed_run(model, seed)[0]

    def timed_run(self, model, seed: int) -> tuple[list[float], list[float]]:
        """Per model call of one sampling run: its seconds, and the seconds spent in the
        self-attention modules (forward hooks on every block's ``attn``)."""
        import time

        import comfy.patcher_extension
        import comfy.sample
        import torch

        calls: list[float] = []
        modules: list[float] = []
        started: list[float] = []
        sync = synchronizer(model.load_device)

        def timer(executor, *args, **kwargs):
            modules.append(0.0)
            t0 = time.perf_counter()
            try:
                out = executor(*args, **kwargs)
                sync()
                return out
            finally:
                calls.append(time.perf_counter() - t0)

        def enter(module, args):
            sync()
            started.append(time.perf_counter())

        def leave(module, args, out):
            sync()
            modules[-1] += time.perf_counter() - started.pop()

        blocks = self.base.model.diffusion_model.blocks
        hooks = [h for b in blocks for h in (b.attn.register_forward_pre_hook(enter), b.attn.register_forward_hook(leave))]
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_timer", timer)
        noise = torch.randn(self.latent.shape, generator=torch.Generator().manual_seed(seed))
        try:
            comfy.sample.sample(m, noise, self.steps, 4.5, "euler", "normal", self.pos, self.neg, self.latent,
                                seed=seed, disable_pbar=True)
        finally:
            for h in hooks:
                h.remove()
        return calls, modules


def model_call_times(latent_side: int, depth: int, repeats: int, window):
    """Step 1's model call and its attention modules with every layer on one technique vs
    unpatched, paired per seed. Returns the unpatched call's median seconds and, per
    technique, (model-call ratio, attention-module ratio)."""
    from ditfastattn_core import Strategy

    bench = TimedSampling(latent_side, depth, steps=2)
    result, plain_times = {}, []
    for name in TECHNIQUES:
        patched = bench.patched(["F", Strategy[name].letter], window)
        bench.timed_run(patched, 0)  # warm-up
        calls, modules = [], []
        for r in range(repeats):
            plain_call, plain_modules = bench.timed_run(bench.base, r)
            call, module = bench.timed_run(patched, r)
            calls.append(call[1] / plain_call[1])
            modules.append(module[1] / plain_modules[1])
            plain_times.append(plain_call[1])
        result[name] = (statistics.median(calls), statistics.median(modules))
    return statistics.median(plain_times), result


def hook_overhead(latent_side: int, depth: int, pairs: int, steps: int, window) -> tuple[float, int]:
    """All-FULL plan vs unpatched: median over every model call of runs done in pairs
    (unpatched, patched, ...), matched by step. Returns (ratio - 1, number of ratios)."""
    bench = TimedSampling(latent_side, depth, steps)
    patched = bench.patched(["F"] * steps, window)
    bench.call_times(patched, 0)  # warm-up
    ratios = []
    for _ in range(pairs):
        plain = bench.call_times(bench.base, 0)
        ratios += [p / b for p, b in zip(bench.call_times(patched, 0), plain, strict=True)]
    return statistics.median(ratios) - 1, len(ratios)


CACHE_LETTERS = ("FWTXTFWC", "FTWTXFCW")
"""A compressing plan's letters per step, for even and odd layers: residuals and reused outputs
held at once, as in calibrated plans."""


def cache_memory(latent_side: int, depth: int, pairs: int, window) -> dict:
    """A compressing plan sampled with its caches on the compute device and in CPU memory:
    the peak cache bytes each run held (``Run.peak_cache_bytes``) against the plan's estimate,
    and the sampling time with CPU caches relative to device caches (median of pairs)."""
    import time

    from ditfastattn_core import CachePlacement
    from ditfastattn_core.comfy_bridge import apply_fastattn
    from ditfastattn_core.comfy_bridge.apply import ApplyRun

    steps = len(CACHE_LETTERS[0])
    bench = TimedSampling(latent_side, depth, steps)
    rows = ["".join(CACHE_LETTERS[layer % 2][step] for layer in range(depth)) for step in range(steps)]
    plan = bench.plan(rows, window)
    models = {p: apply_fastattn(bench.base, plan, cache_placement=p) for p in CachePlacement}
    peaks: dict = {}
    original = ApplyRun.finish

    def finish(run):
        stats = original(run)
        peaks[run.state.placement] = run.peak_cache_bytes
        return stats

    ApplyRun.finish = finish
    try:
        times: dict = {p: [] for p in CachePlacement}
        for p in CachePlacement:
            bench.call_times(models[p], 0)  # warm-up
        for _ in range(pairs):
            for p in CachePlacement:
                t0 = time.perf_counter()
                bench.call_times(models[p], 0)
                times[p].append(time.perf_counter() - t0)
    finally:
        ApplyRun.finish = original
    device, cpu = times[CachePlacement.DEVICE], times[CachePlacement.CPU]
    return {
        "plan": rows,
        "estimate": plan.cache_estimate(dtype=bench.base.model.get_dtype()),
        "measured": peaks,
        "device_time": statistics.median(device),
        "cpu_ratio": statistics.median(c / d for c, d in zip(cpu, device, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image sizes (latent = size/8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--tile", type=int, default=256, help="window tile (0: the exact paper band)")
    ap.add_argument("--no-model", action="store_true", help="attention timings only")
    ap.add_argument("--model-repeats", type=int, default=None, help="repeats of the model-call timing")
    ap.add_argument(
        "--overhead-pairs",
        type=int,
        default=0,
        help="also measure the all-FULL hook overhead over this many pairs of 8-step runs",
    )
    ap.add_argument("--cache-pairs", type=int, default=3,
                    help="pairs of runs for the cache memory table (0: skip it)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    import_comfy(args.device)
    import torch

    from ditfastattn_core import Strategy, WindowSpec
    from ditfastattn_core.cache_memory import format_bytes

    window = WindowSpec(tile=(args.tile,)) if args.tile else WindowSpec()
    print(f"torch {torch.__version__}, {args.device}, CPU threads {torch.get_num_threads()}, PixArt-Sigma-XL width, depth "
          f"{args.depth}, window {window}, median of {args.repeats}")
    for size in args.sizes:
        side = size // 16  # latent = size/8, patch 2
        att, frac, full_t = attention_latency(side, args.repeats, window)
        plain = calls = None
        if not args.no_model:
            plain, calls = model_call_times(size // 8, args.depth, args.model_repeats or args.repeats, window)
        print(f"\n{size}x{size}: {side * side} tokens, window fraction {frac:.3f}, dense attention "
              f"{full_t * 1e3:.0f} ms (CFG batch 2)")
        head = (f"{'technique':<11} {'attn FLOPs':>10} {'attn time':>10} {'time/FLOPs':>10} {'attn module':>11} "
                f"{'model call':>10} {'cache/layer':>12}")
        print(head)
        print("-" * len(head))
        for name in TECHNIQUES:
            s = Strategy[name]
            flops = s.cost(frac, has_cfg=True)
            t = att[name][0]
            ratio = f"{t / flops:>10.2f}" if flops else f"{'-':>10}"
            model = f"{calls[name][0]:>10.1%}" if calls else f"{'-':>10}"
            module = f"{calls[name][1]:>11.1%}" if calls else f"{'-':>11}"
            mem = att[name][1] / 2**20
            print(f"{name:<11} {flops:>10.1%} {t:>10.1%} {ratio} {module} {model} {mem:>9.1f} MiB")
        if calls:
            print(f"hook overhead, all-FULL plan vs unpatched model call: {calls['FULL'][0] - 1:+.2%} "
                  f"(unpatched call {plain:.2f} s)")
        if args.cache_pairs:
            c = cache_memory(size // 8, args.depth, args.cache_pairs, window)
            e = c["estimate"]
            measured = ", ".join(f"{p.value} {format_bytes(b)}" for p, b in c["measured"].items())
            print(f"cache memory, plan {'/'.join(c['plan'])} ({len(c['plan'])} euler steps, batch 1, CFG): "
                  f"estimated peak {format_bytes(e.peak_bytes)} after step {e.peak_step} "
                  f"({e.peak_bytes // e.entry_bytes} x {format_bytes(e.entry_bytes)}); measured peak: {measured}; "
                  f"sampling with caches in CPU memory: {c['cpu_ratio']:.3f}x the time with caches on the "
                  f"{args.device} (median of {args.cache_pairs} pairs; {c['device_time']:.1f} s per run)")
        if args.overhead_pairs:
            overhead, n = hook_overhead(size // 8, args.depth, args.overhead_pairs, 8, window)
            print(f"hook overhead, all-FULL plan vs unpatched, median of {n} model calls "
                  f"matched by step: {overhead:+.2%}")


if __name__ == "__main__":
    main()
