"""What runs compressed and what runs FULL in graphs that call the model several times per step.

Tiny models of real families (random weights, the integration tests' builders) sampled through
ComfyUI's own nodes for each composition, with a plan that uses every strategy
(F, T, W, X, C, T over six steps). Prints, per composition, the layer calls (per cond chunk)
that ran compressed (reuse / window / cfg_copy), those computed dense (the plan's FULL cells and
every fallback), and the fallbacks by reason: no cache of their own call site or step, or no CFG
pair to share within.

    COMFYUI_PATH=/path/to/ComfyUI python bench/compositions.py
"""

from __future__ import annotations

import logging
import sys

from comfy_setup import ROOT, import_comfy

STEPS = 6
ROWS = ["F", "T", "W", "X", "C", "T"]
COMPRESSED = ("reuse", "window", "cfg_copy")


def main() -> None:
    import_comfy()
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib

    import torch

    from ditfastattn_core import Plan, Schedule
    from ditfastattn_core.comfy_bridge import apply_fastattn, detect_family, layer_count

    tiny_mod = importlib.import_module("integration.tiny")
    import comfy.sample
    import comfy.samplers

    stats: dict[str, int] = {}

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("FastAttn run: "):
                stats.clear()
                stats.update({k: int(v) for k, v in (p.rsplit(" ", 1) for p in msg[14:].split(", "))})

    log = logging.getLogger("ditfastattn")
    log.setLevel(logging.INFO)
    log.addHandler(Grab())

    def plan(tiny):
        family = detect_family(tiny.patcher.model)
        n = layer_count(tiny.patcher.model, family)
        return Plan(schedule=Schedule.from_letters([r * n for r in ROWS]), family=family.name,
                    sigmas=tuple(float(STEPS - i) for i in range(STEPS + 1)), cfg=3.0)

    def sample(tiny, model, positive=None):
        noise = torch.randn(tiny.latent.shape, generator=torch.Generator().manual_seed(0))
        comfy.sample.sample(model, noise, STEPS, 3.0, "euler", "normal", positive or tiny.positive, tiny.negative,
                            tiny.latent, seed=0, disable_pbar=True)

    def guided(tiny, guider):
        sigmas = comfy.samplers.calculate_sigmas(tiny.patcher.get_model_object("model_sampling"), "normal", STEPS)
        noise = torch.randn(tiny.latent.shape, generator=torch.Generator().manual_seed(0))
        guider.sample(noise, tiny.latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0, disable_pbar=True)

    def result(out):
        return out[0] if isinstance(out, (tuple, list)) else out.result[0]

    def node(module, name):
        return getattr(importlib.import_module(module), name, None)

    flux = tiny_mod.flux()
    wan = tiny_mod.wan()
    wan.latent = torch.zeros(1, 16, 9, 4, 6)
    empty = [[torch.zeros_like(flux.positive[0][0]), dict(flux.positive[0][1])]]
    windows_node = node("comfy_extras.nodes_context_windows", "ContextWindowsManualNode")

    def windows(model, schedule):
        import inspect

        args = dict(model=model, context_length=3, context_overlap=1, context_schedule=schedule, context_stride=1,
                    closed_loop=False, fuse_method="pyramid", dim=2)
        if "freenoise" in inspect.signature(windows_node.execute).parameters:
            args["freenoise"] = False
        return result(windows_node.execute(**args))

    slg = node("comfy_extras.nodes_slg", "SkipLayerGuidanceDiT")
    slg_simple = node("comfy_extras.nodes_slg", "SkipLayerGuidanceDiTSimple")
    perp = node("comfy_extras.nodes_perpneg", "PerpNeg")
    perp_guider = node("comfy_extras.nodes_perpneg", "PerpNegGuider")
    dual = node("comfy_extras.nodes_custom_sampler", "DualCFGGuider")
    dual_make = getattr(dual, "execute", None) or dual().get_guider
    easy = node("comfy_extras.nodes_easycache", "EasyCacheNode")
    import nodes

    combined = flux.positive + [[flux.positive[0][0] * -1.0, dict(flux.positive[0][1])]]
    area = flux.positive + nodes.ConditioningSetArea().append(
        [[flux.positive[0][0] * -1.0, dict(flux.positive[0][1])]], 64, 96, 0, 0, 1.0)[0]

    cases = {
        "plain (flux)": lambda: sample(flux, apply_fastattn(flux.patcher, plan(flux))),
        **{f"context windows {s} (wan, 9 frames, 3/1)": (lambda s=s: sample(
            wan, apply_fastattn(windows(wan.patcher, s), plan(wan))))
           for s in ("standard_static", "standard_uniform", "looped_uniform", "batched")},
        "SkipLayerGuidanceDiT (flux, double block 1)": lambda: sample(flux, apply_fastattn(
            result(slg.execute(flux.patcher, 3.0, 0.0, 1.0, double_layers="1", single_layers="")), plan(flux))),
        "SkipLayerGuidanceDiTSimple (flux)": lambda: sample(flux, apply_fastattn(
            result(slg_simple.execute(flux.patcher, 0.0, 1.0, double_layers="1", single_layers="")), plan(flux))),
        "PerpNeg (flux)": lambda: sample(flux, apply_fastattn(result(perp.execute(flux.patcher, empty, 1.0)),
                                                              plan(flux))),
        "PerpNegGuider (flux)": lambda: guided(flux, result(perp_guider.execute(
            apply_fastattn(flux.patcher, plan(flux)), flux.positive, flux.negative, empty, 3.0, 1.0))),
        "DualCFGGuider regular (flux)": lambda: guided(flux, result(dual_make(
            apply_fastattn(flux.patcher, plan(flux)), flux.positive, empty, flux.negative, 3.0, 2.0, "regular"))),
        "DualCFGGuider nested (flux)": lambda: guided(flux, result(dual_make(
            apply_fastattn(flux.patcher, plan(flux)), flux.positive, empty, flux.negative, 3.0, 2.0, "nested"))),
        "ConditioningCombine (flux, 2 positive)": lambda: sample(flux, apply_fastattn(flux.patcher, plan(flux)),
                                                                 positive=combined),
        "area cond (flux)": lambda: sample(flux, apply_fastattn(flux.patcher, plan(flux)), positive=area),
        "EasyCache 0.05 (flux)": lambda: sample(flux, apply_fastattn(
            result(easy.execute(flux.patcher, 0.05, 0.0, 1.0, False)), plan(flux))),
    }
    print(f"plan rows: {' '.join(ROWS)} ({STEPS} euler steps, cfg 3); counts are layer calls per cond chunk\n")
    print("| composition | compressed (reuse / window / cfg_copy) | dense (plan's FULL + fallbacks) | fallbacks by reason |")
    print("|---|---|---|---|")
    for name, run in cases.items():
        try:
            run()
        except Exception as e:  # a node this tree lacks
            print(f"| {name} | not run: {type(e).__name__}: {e} | | |")
            continue
        compressed = "/".join(str(stats.get(k, 0)) for k in COMPRESSED)
        missed = {k: v for k, v in stats.items() if k not in COMPRESSED and k != "dense"}
        print(f"| {name} | {sum(stats.get(k, 0) for k in COMPRESSED)} ({compressed}) | {stats.get('dense', 0)} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(missed.items())) or '0'} |")


if __name__ == "__main__":
    main()
