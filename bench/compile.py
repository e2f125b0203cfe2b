"""FastAttn under ComfyUI's TorchCompileModel node (inductor), against the same model without it.

One process, one model (SD3's MMDiT architecture with random weights: 64 x depth hidden, depth
heads of 64; attention cost does not depend on the values), six ways of sampling it:

    eager      no pack | all-FULL plan | compressing plan
    compiled   no pack | all-FULL plan | compressing plan   (Apply FastAttn -> TorchCompileModel)

Each is sampled once to warm up (for the compiled ones: the compilation; timed on its own), then
``--repeats`` times; the table gives medians and ratios against compiled sampling without the
pack. Every compiled way starts from an empty dynamo cache: ComfyUI 0.29.0's TorchCompileModel
does not guard on transformer_options, so graphs compiled for one way would be reused by the
next (the pack detects such a call and recompiles, see ``wrappers.ran_stale_graph``, which
would charge a compilation to the timed runs), and the ways cannot be interleaved. Every FastAttn run's statistics are checked: the compressing plan
must have computed windows, reused outputs and shared CFG rows (not silently run FULL), and the
all-FULL plan nothing of the kind. torch._dynamo's counters give the graph breaks and
recompilations.

    COMFYUI_PATH=... OMP_NUM_THREADS=1 python bench/compile.py [--size 512] [--depth 4] [--steps 8]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass, field

from comfy_setup import import_comfy, random_weights

CFG = 4.5
SAMPLER, SCHEDULER = "euler", "normal"
WINDOW = "band 1/8, 256-token tiles (fast on CPU)"
COMPRESSING = ["F", "WX", "T", "XW", "T", "WX", "T", "XW"]
"""The compressing plan's rows (cycled over the steps, each row's letters over the layers): a hand-written
plan that uses every technique (WA-RS, WA-RS + CFG sharing, AST), not a calibrated one."""


@dataclass
class Way:
    name: str
    model: object
    compiled: bool
    compressing: bool | None
    """None: no pack; False: the all-FULL plan; True: the compressing plan."""
    first: float = 0.0
    graph_breaks: int = 0
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


class RunStats(logging.Handler):
    """The statistics line each FastAttn run logs when it finishes."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: dict[str, int] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("FastAttn run: "):
            self.last = {k: int(v) for k, v in (p.rsplit(" ", 1) for p in msg[len("FastAttn run: "):].split(", "))}


def sd3_shaped(depth: int, size: int):
    """SD3's MMDiT at ``depth`` (hidden 64 x depth, depth heads of 64), random weights, sized for a
    ``size``^2 image (``size`` / 16 tokens a side)."""
    import comfy.supported_models

    side = size // 16
    cfg = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16,
           "depth": depth, "input_size": None, "adm_in_channels": 256, "qk_norm": "rms",
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": 256, "out_features": 64 * depth}},
           "num_patches": side * side, "pos_embed_max_size": side, "x_block_self_attn_layers": []}
    return random_weights(comfy.supported_models.SD3(cfg), buffers=("diffusion_model.pos_embed",))


def conditioning(seed: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 256, generator=g), {"pooled_output": torch.randn(1, 256, generator=g)}]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image size (size/16 tokens a side)")
    ap.add_argument("--depth", type=int, default=4, help="MMDiT blocks (hidden 64 x depth)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=77)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds over the six ways")
    args = ap.parse_args()

    comfyui = import_comfy()
    import comfy.samplers
    import comfyui_version
    import torch
    import torch._dynamo.utils
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    import nodes
    from ditfastattn_core import Plan, Schedule, WindowSpec
    from ditfastattn_core.comfy_bridge import apply_fastattn, detect_family
    from ditfastattn_core.window import PRESETS

    base = sd3_shaped(args.depth, args.size)
    side = args.size // 16
    latent = {"samples": torch.zeros(1, 16, args.size // 8, args.size // 8)}
    positive, negative = conditioning(1, args.text_tokens), conditioning(2, args.text_tokens)
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), SCHEDULER, args.steps)
    window: WindowSpec = PRESETS[WINDOW]

    def plan(rows: list[str]) -> Plan:
        letters = [(rows[s % len(rows)] * args.depth)[:args.depth] for s in range(args.steps)]
        return Plan(schedule=Schedule.from_letters(letters), family=detect_family(base.model).name,
                    sigmas=tuple(sigmas.tolist()), sampler=SAMPLER, scheduler=SCHEDULER, cfg=CFG,
                    grid=(side, side), window=window)

    full, fast = plan(["F"]), plan(COMPRESSING)

    def compiled(model):
        return TorchCompileModel.execute(model, "inductor").args[0]

    ways = [
        Way("eager, no pack", base, False, None),
        Way("eager, all-FULL plan", apply_fastattn(base, full), False, False),
        Way("eager, compressing plan", apply_fastattn(base, fast), False, True),
        Way("compiled, no pack", compiled(base), True, None),
        Way("compiled, all-FULL plan", compiled(apply_fastattn(base, full)), True, False),
        Way("compiled, compressing plan", compiled(apply_fastattn(base, fast)), True, True),
    ]
    stats = RunStats()
    logging.getLogger("ditfastattn").addHandler(stats)
    logging.getLogger("ditfastattn").setLevel(logging.INFO)
    outputs = {}

    def sample(way: Way) -> float:
        stats.last = None
        t0 = time.perf_counter()
        out = nodes.common_ksampler(way.model, 0, args.steps, CFG, SAMPLER, SCHEDULER, positive, negative,
                                    latent)[0]["samples"]
        seconds = time.perf_counter() - t0
        check_stats(way, stats.last)
        outputs[way.name] = out
        return seconds

    print(f"ComfyUI {comfyui_version.__version__} at {comfyui}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    counters = torch._dynamo.utils.counters
    recompiled = 0
    for way in ways:
        if way.compiled:
            torch._dynamo.reset()
        breaks = sum(counters["graph_break"].values())
        way.first = sample(way)
        way.graph_breaks = sum(counters["graph_break"].values()) - breaks
        frames = counters["frames"]["total"]
        way.times = [sample(way) for _ in range(args.repeats)]
        recompiled += counters["frames"]["total"] - frames
        print(f"  {way.name}: first {way.first:.1f} s, then {' '.join(f'{t:.2f}' for t in way.times)} s", flush=True)

    baseline = ways[3].median
    print(f"\nSD3 MMDiT architecture (random weights), depth {args.depth} (hidden {64 * args.depth}, "
          f"{args.depth} heads x 64), {args.size}^2 ({side * side} image + {args.text_tokens} text tokens), "
          f"{args.steps} {SAMPLER} steps, CFG {CFG} (batched), fp32 CPU")
    print(f"compressing plan: {' '.join(fast.schedule.to_letters())}; {fast.cost().describe()}")
    print(f"\n| sampling | first run (s) | median of {args.repeats} (s) | vs compiled, no pack | graph breaks |")
    print("|---|---|---|---|---|")
    for way in ways:
        breaks = way.graph_breaks if way.compiled else "-"
        print(f"| {way.name} | {way.first:.1f} | {way.median:.2f} | {way.median / baseline:.3f} | {breaks} |")
    print("\ngraph breaks by reason (all compiled ways): "
          + ("; ".join(f"{n} x {r}" for r, n in graph_break_reasons(counters["graph_break"]).items()) or "none"))
    print(f"frames compiled after the warm-ups: {recompiled}")
    for name in ("all-FULL plan", "compressing plan"):
        e, c = outputs[f"eager, {name}"], outputs[f"compiled, {name}"]
        print(f"compiled vs eager, {name}: max |diff| {(e - c).abs().max().item():.2e} "
              f"(max |x| {e.abs().max().item():.2e})")


def graph_break_reasons(counter: dict[str, int]) -> dict[str, int]:
    """Dynamo's graph-break counter by the first line of each reason (the rest names objects)."""
    out: dict[str, int] = {}
    for reason, n in counter.items():
        first = reason.splitlines()[0]
        out[first] = out.get(first, 0) + n
    return out


def check_stats(way: Way, stats: dict[str, int] | None) -> None:
    """A FastAttn run really did what its plan says (a silent FULL fallback must not be timed)."""
    if way.compressing is None:
        return
    if stats is None:
        if way.compressing:
            raise SystemExit(f"{way.name}: the run logged no FastAttn statistics")
        return  # an all-FULL run that kept nothing counts nothing
    compressed = {k: stats.get(k, 0) for k in ("window", "reuse", "cfg_copy")}
    misses = {k: v for k, v in stats.items() if k.endswith("_miss") or k in ("unmapped", "passthrough")}
    if misses:
        raise SystemExit(f"{way.name}: cache misses or unmapped calls {misses}")
    if way.compressing and not all(compressed.values()):
        raise SystemExit(f"{way.name}: the plan's techniques did not all run: {stats}")
    if not way.compressing and any(compressed.values()):
        raise SystemExit(f"{way.name}: an all-FULL plan compressed something: {stats}")


if __name__ == "__main__":
    main()
