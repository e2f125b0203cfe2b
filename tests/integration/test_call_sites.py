"""Graphs that call the model several times per step: every compressed call reads only what the
same call site computed (context windows, skip-layer guidance, guiders with extra conds, several
conds), all-FULL stays bit-exact beside each of them in both node orders, and what cannot be
compressed runs FULL, counted and explained.

The oracle never uses the pack's cache keys. ``CallOracle`` installs, before FastAttn, its own
PREDICT_NOISE / CALC_COND_BATCH / APPLY_MODEL wrappers (which call is this: the context window's
frames, the calc_cond_batch's rank in the model evaluation, the blocks it replaces, the conds'
uuids) and an inner attention override, which FastAttn chains for every dense computation and
which records each computed attention output per call, layer and cond. A spy on the run's
``attention`` records what each compressed layer returned. Every AST layer that computed
nothing must return exactly the output the oracle recorded for the same call and cond at the
previous step; one that computed (a fallback) must have had no such output to read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict

import pytest
import torch

from ditfastattn_core import Plan, Schedule
from ditfastattn_core.comfy_bridge import apply_fastattn, detect_family, layer_count
from ditfastattn_core.comfy_bridge.run import Run

from .test_apply import run_stats
from .tiny import flux, ltxv, wan

STEPS = 5


def _rows_to_heads(t: torch.Tensor, output_heads: bool) -> torch.Tensor:
    """An attention output as (B, L, H*D), whichever of ComfyUI's layouts it came in."""
    if output_heads:
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)
    return t


class CallOracle:
    """The test's own record of which model call computed which attention output."""

    def __init__(self) -> None:
        self.computed: dict[tuple, torch.Tensor] = {}
        """(sigma, call, layer, cond uuid) -> attention output of that chunk (B, L, H*D)."""
        self.returned: list[dict] = []
        """Per compressible layer call: sigma, call, layer, per-cond output, computed or not."""
        self.ranks: Counter = Counter()
        self.frames_stack: list = []
        self.call: tuple | None = None
        self.uuids: tuple = ()
        self.sigma: float | None = None
        self.sample_sigmas: list[float] = []
        self.layer: int | None = None
        self.computed_in_layer = False

    # --- the oracle's view of a call ------------------------------------------------------
    def install(self, model):
        import comfy.patcher_extension as ext

        def bound(method):  # a plain function: ComfyUI 0.3.64 deep-copies model options, bound methods too
            def call(*args, **kwargs):
                return method(*args, **kwargs)
            return call

        m = model.clone()
        m.add_wrapper_with_key(ext.WrappersMP.PREDICT_NOISE, "oracle", bound(self._predict_noise))
        m.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, "oracle", bound(self._calc_cond_batch))
        m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, "oracle", bound(self._apply_model))
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = bound(self._override)
        return m

    def _predict_noise(self, executor, *args, **kwargs):
        self.ranks.clear()
        return executor(*args, **kwargs)

    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        options = model_options.get("transformer_options", {})
        window = options.get("context_window")
        frames = None
        if window is not None:
            anchor = getattr(window, "causal_anchor_index", None)
            frames = ((anchor,) if anchor is not None else ()) + tuple(window.index_list)
        replaced = tuple(sorted(str(k) for d in (options.get("patches_replace") or {}).values() for k in d))
        rank = self.ranks[frames]
        self.ranks[frames] += 1
        self.frames_stack.append((frames, rank, replaced))
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            self.frames_stack.pop()

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                     **kwargs):
        self.call = self.frames_stack[-1] if self.frames_stack else (None, 0, ())
        self.uuids = tuple(transformer_options.get("uuids") or ())
        self.sigma = float(t.reshape(-1)[0])
        self.sample_sigmas = [float(s) for s in transformer_options["sample_sigmas"]]
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _override(self, func, *args, **kwargs):
        out = func(*args, **kwargs)
        if self.layer is not None:
            self.computed_in_layer = True
            rows = _rows_to_heads(out, kwargs.get("skip_output_reshape", False))
            for uuid, chunk in zip(self.uuids, rows.chunk(len(self.uuids)), strict=True):
                self.computed[(self.sigma, self.call, self.layer, uuid)] = chunk.clone()
        return out

    # --- the spy on FastAttn's compressible layers ----------------------------------------
    def spy(self, monkeypatch) -> None:
        original = Run.attention
        oracle = self

        def attention(run, call, layer, ctx, q, k, v, dense, passthrough, **layout):
            oracle.layer, oracle.computed_in_layer = layer, False
            try:
                out = original(run, call, layer, ctx, q, k, v, dense, passthrough, **layout)
            finally:
                oracle.layer = None
            rows = _rows_to_heads(out, layout.get("skip_output_reshape", False))
            oracle.returned.append({
                "sigma": oracle.sigma, "call": oracle.call, "layer": layer, "computed": oracle.computed_in_layer,
                "strategy": run.strategy(call.step, layer).letter,
                "chunks": dict(zip(oracle.uuids, rows.chunk(len(oracle.uuids)), strict=True)),
            })
            return out

        monkeypatch.setattr(Run, "attention", attention)

    def previous_sigma(self, sigma: float) -> float | None:
        i = self.sample_sigmas.index(sigma)
        return self.sample_sigmas[i - 1] if i > 0 else None

    def check_reuse(self) -> Counter:
        """Every AST layer call reused its own call's and cond's previous output, or computed
        because there was none; returns counts per outcome."""
        counts: Counter = Counter()
        for r in self.returned:
            if r["strategy"] != "T":
                continue
            prev = self.previous_sigma(r["sigma"])
            for uuid, chunk in r["chunks"].items():
                source = self.computed.get((prev, r["call"], r["layer"], uuid))
                if r["computed"]:
                    assert source is None, f"{r['call']} layer {r['layer']}: ran FULL although its call kept an output"
                    counts["full"] += 1
                else:
                    assert source is not None, f"{r['call']} layer {r['layer']} reused an output its call never made"
                    assert torch.equal(chunk, source), f"{r['call']} layer {r['layer']} reused another call's output"
                    counts["reused"] += 1
        return counts


def _plan(tiny, rows):
    family = detect_family(tiny.patcher.model)
    return Plan(schedule=Schedule.from_letters(rows), family=family.name,
                sigmas=tuple(float(STEPS - i) for i in range(STEPS + 1)), cfg=3.0)


def _alternating(tiny, letter="T"):
    layers = layer_count(tiny.patcher.model, detect_family(tiny.patcher.model))
    return [("F" if s % 2 == 0 else letter) * layers for s in range(STEPS)]


def _all_full(tiny):
    layers = layer_count(tiny.patcher.model, detect_family(tiny.patcher.model))
    return ["F" * layers] * STEPS


def _sample(tiny, model, latent=None, positive=None, negative=None, cfg=3.0):
    import comfy.sample

    latent = tiny.latent if latent is None else latent
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal", positive or tiny.positive,
                               negative or tiny.negative, latent, seed=0, disable_pbar=True)


def _sample_guider(tiny, guider):
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(tiny.patcher.get_model_object("model_sampling"), "normal", STEPS)
    noise = torch.randn(tiny.latent.shape, generator=torch.Generator().manual_seed(0))
    return guider.sample(noise, tiny.latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                         disable_pbar=True)


def _node(module: str, name: str):
    import importlib

    cls = getattr(importlib.import_module(module), name, None)
    if cls is None:
        import comfyui_version

        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no {name}")
    return cls


def _result(output):
    return output[0] if isinstance(output, (tuple, list)) else output.result[0]


# --- context windows ---------------------------------------------------------------------------

FRAMES = 9


@pytest.fixture(scope="module")
def tiny_wan():
    t = wan()
    t.latent = torch.zeros(1, 16, FRAMES, 4, 6)
    return t


def context_windows(model, schedule: str, length: int = 3, overlap: int = 1):
    node = _node("comfy_extras.nodes_context_windows", "ContextWindowsManualNode")
    import inspect

    args = dict(model=model, context_length=length, context_overlap=overlap, context_schedule=schedule,
                context_stride=1, closed_loop=False, fuse_method="pyramid", dim=2)
    accepted = inspect.signature(node.execute).parameters
    if "freenoise" in accepted:
        args["freenoise"] = False
    return _result(node.execute(**args))


SCHEDULES = ["standard_static", "standard_uniform", "looped_uniform", "batched"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_context_windows_reuse_their_own_windows_output(tiny_wan, schedule, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    oracle = CallOracle()
    oracle.spy(monkeypatch)
    model = apply_fastattn(context_windows(oracle.install(tiny_wan.patcher), schedule),
                           _plan(tiny_wan, _alternating(tiny_wan)))
    out = _sample(tiny_wan, model)
    assert torch.isfinite(out).all()
    counts = oracle.check_reuse()
    windows = {r["call"][0] for r in oracle.returned}
    assert len(windows) > 1 and None not in windows, "the run went through several context windows"
    stats = run_stats(caplog)
    assert counts["reused"] > 0, counts
    assert stats.get("ast_no_site", 0) == counts["full"], (stats, counts)
    if schedule in ("standard_static", "batched"):
        assert counts["full"] == 0, f"windows stay put under {schedule}: every AST reads its window ({counts})"
    if counts["full"]:
        assert any("context windows shift from step to step" in r.getMessage() for r in caplog.records)


def test_wan_context_windows_node_default_schedule(tiny_wan, monkeypatch, caplog):
    import inspect

    caplog.set_level(logging.INFO, logger="ditfastattn")
    node = _node("comfy_extras.nodes_context_windows", "WanContextWindowsManualNode")
    oracle = CallOracle()
    oracle.spy(monkeypatch)
    args = dict(model=oracle.install(tiny_wan.patcher), context_length=9, context_overlap=4,
                context_schedule="standard_uniform", context_stride=1, closed_loop=False, fuse_method="pyramid")
    if "freenoise" in inspect.signature(node.execute).parameters:
        args["freenoise"] = False
    model = apply_fastattn(_result(node.execute(**args)), _plan(tiny_wan, _alternating(tiny_wan)))
    _sample(tiny_wan, model)
    counts = oracle.check_reuse()
    assert counts["reused"] + counts["full"] > 0 and len({r["call"][0] for r in oracle.returned}) > 1


def test_ltxv_context_windows(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    node = _node("comfy_extras.nodes_context_windows", "LTXVContextWindowsNode")
    tiny = ltxv()
    tiny.latent = torch.zeros(1, 128, 7, 4, 6)
    oracle = CallOracle()
    oracle.spy(monkeypatch)
    windowed = _result(node.execute(oracle.install(tiny.patcher), context_length=17, context_overlap=8,
                                    context_schedule="standard_static", fuse_method="pyramid", freenoise=False))
    _sample(tiny, apply_fastattn(windowed, _plan(tiny, _alternating(tiny))))
    counts = oracle.check_reuse()
    assert counts["reused"] > 0 and len({r["call"][0] for r in oracle.returned}) > 1, counts


def test_context_window_cache_memory_estimate_matches_the_measured_peak(tiny_wan, caplog):
    """Static windows: the node's estimate (per window, at its size, anchors included) is the
    measured peak; shifting windows: an upper bound."""
    from ditfastattn_core.comfy_bridge.apply import ApplyRun

    caplog.set_level(logging.INFO, logger="ditfastattn")
    layers = layer_count(tiny_wan.patcher.model, detect_family(tiny_wan.patcher.model))
    rows = ["F" * layers] + ["T" * layers] * (STEPS - 1)
    from ditfastattn_core.cache_memory import AttentionSize

    plan = dataclasses.replace(_plan(tiny_wan, rows), grid=(FRAMES, 2, 3), attention=AttentionSize(FRAMES * 6, 64))
    for schedule, exact in (("standard_static", True), ("standard_uniform", False)):
        windowed = context_windows(tiny_wan.patcher, schedule)
        peaks = []
        original = ApplyRun.finish

        def spy(self, peaks=peaks, original=original):
            stats = original(self)
            peaks.append((self.peak_cache_bytes, self.estimate))
            return stats

        ApplyRun.finish = spy
        try:
            from ditfastattn_core.comfy_bridge import apply_config

            _sample(tiny_wan, apply_fastattn(windowed, plan))
            config = apply_config(windowed, plan)
            described = config.describe_caches(tuple(tiny_wan.latent.shape), windowed.model_options)
        finally:
            ApplyRun.finish = original
        (measured, estimate), = peaks
        assert estimate is not None and estimate.windows and "context windows" in described
        if exact:
            assert measured == estimate.peak_bytes, (measured, estimate)
        else:
            assert 0 < measured <= estimate.peak_bytes, (measured, estimate)
        print(f"{schedule}: measured peak {measured} B, estimate {estimate.peak_bytes} B, {estimate.windows} windows")


# --- guidance calls ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    return flux()


def _slg(model, simple: bool):
    node = _node("comfy_extras.nodes_slg", "SkipLayerGuidanceDiTSimple" if simple else "SkipLayerGuidanceDiT")
    if simple:
        return _result(node.execute(model, 0.0, 1.0, double_layers="1", single_layers=""))
    return _result(node.execute(model, 3.0, 0.0, 1.0, double_layers="1", single_layers=""))


@pytest.mark.parametrize("simple", [False, True])
def test_skip_layer_guidance_calls_keep_their_own_caches(tiny_flux, simple, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    oracle = CallOracle()
    oracle.spy(monkeypatch)
    model = apply_fastattn(_slg(oracle.install(tiny_flux.patcher), simple), _plan(tiny_flux, _alternating(tiny_flux)))
    out = _sample(tiny_flux, model)
    assert torch.isfinite(out).all()
    counts = oracle.check_reuse()
    assert counts["reused"] > 0 and counts["full"] == 0, counts
    guidance = [r for r in oracle.returned if r["call"][1] > 0 or r["call"][2]]
    messages = " ".join(r.getMessage() for r in caplog.records)
    if guidance:  # the model names its blocks: the guidance call is compressed, from its own caches
        assert any(not r["computed"] and r["strategy"] == "T" for r in guidance)
    else:  # it does not (ComfyUI before block indices): the guidance call runs FULL and says so
        assert "replace or skip blocks" in messages and run_stats(caplog).get("replaced_blocks_full", 0) > 0


def _empty(tiny):
    return [[torch.zeros_like(tiny.positive[0][0]), dict(tiny.positive[0][1])]]


def test_perp_neg_extra_call_keeps_its_own_caches(tiny_flux, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    node = _node("comfy_extras.nodes_perpneg", "PerpNeg")
    oracle = CallOracle()
    oracle.spy(monkeypatch)
    perp = _result(node.execute(oracle.install(tiny_flux.patcher), _empty(tiny_flux), 1.0))
    _sample(tiny_flux, apply_fastattn(perp, _plan(tiny_flux, _alternating(tiny_flux))))
    counts = oracle.check_reuse()
    assert counts["reused"] > 0 and counts["full"] == 0, counts
    assert any(r["call"][1] == 1 for r in oracle.returned), "the extra call was compressed too"


GUIDERS = ["perp_neg_guider", "dual_cfg_regular", "dual_cfg_nested"]


def _guider(tiny, model, name):
    if name == "perp_neg_guider":
        node = _node("comfy_extras.nodes_perpneg", "PerpNegGuider")
        return _result(node.execute(model, tiny.positive, tiny.negative, _empty(tiny), 3.0, 1.0))
    node = _node("comfy_extras.nodes_custom_sampler", "DualCFGGuider")
    make = getattr(node, "execute", None) or node().get_guider  # a V3 node on 0.29, V1 on 0.3.64
    return _result(make(model, tiny.positive, _empty(tiny), tiny.negative, 3.0, 2.0, name.split("_")[-1]))


@pytest.mark.parametrize("name", GUIDERS)
def test_guiders_with_extra_conds(tiny_flux, name, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    plain = _sample_guider(tiny_flux, _guider(tiny_flux, tiny_flux.patcher, name))
    full = apply_fastattn(tiny_flux.patcher, _plan(tiny_flux, _all_full(tiny_flux)))
    assert torch.equal(_sample_guider(tiny_flux, _guider(tiny_flux, full, name)), plain)
    oracle = CallOracle()
    oracle.spy(monkeypatch)
    model = apply_fastattn(oracle.install(tiny_flux.patcher), _plan(tiny_flux, _alternating(tiny_flux)))
    _sample_guider(tiny_flux, _guider(tiny_flux, model, name))
    counts = oracle.check_reuse()
    assert counts["reused"] > 0 and counts["full"] == 0, counts
    caplog.clear()
    shared = apply_fastattn(tiny_flux.patcher, _plan(tiny_flux, _alternating(tiny_flux, "C")))
    out = _sample_guider(tiny_flux, _guider(tiny_flux, shared, name))
    assert torch.isfinite(out).all()
    stats = run_stats(caplog)
    assert stats.get("asc_not_cfg_pair", 0) > 0 and "cfg_copy" not in stats, \
        f"three conds are no CFG pair: ASC computes every cond ({stats})"
    assert any("not one positive and one negative" in r.getMessage() for r in caplog.records)


# --- several conds ------------------------------------------------------------------------------


def _combined(tiny):
    second = [[tiny.positive[0][0] * -1.0, dict(tiny.positive[0][1])]]
    return tiny.positive + second


def _area(tiny):
    node = _node("nodes", "ConditioningSetArea")
    second = node().append([[tiny.positive[0][0] * -1.0, dict(tiny.positive[0][1])]], 64, 96, 0, 0, 1.0)[0]
    return tiny.positive + second


def _mask(tiny):
    node = _node("nodes", "ConditioningSetMask")
    mask = torch.zeros(1, 16 * 8, 24 * 8)
    mask[:, :, : 12 * 8] = 1.0
    second = node().append([[tiny.positive[0][0] * -1.0, dict(tiny.positive[0][1])]], mask, "default", 1.0)[0]
    return tiny.positive + second


@pytest.mark.parametrize("conds", ["combined", "area", "mask"])
def test_several_conds_keep_their_own_caches(tiny_flux, conds, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ditfastattn")
    positive = {"combined": _combined, "area": _area, "mask": _mask}[conds](tiny_flux)
    plain = _sample(tiny_flux, tiny_flux.patcher, positive=positive)
    full = apply_fastattn(tiny_flux.patcher, _plan(tiny_flux, _all_full(tiny_flux)))
    assert torch.equal(_sample(tiny_flux, full, positive=positive), plain)
    oracle = CallOracle()
    oracle.spy(monkeypatch)
    model = apply_fastattn(oracle.install(tiny_flux.patcher), _plan(tiny_flux, _alternating(tiny_flux)))
    _sample(tiny_flux, model, positive=positive)
    counts = oracle.check_reuse()
    assert counts["reused"] > 0 and counts["full"] == 0, counts
    uuids = {u for r in oracle.returned for u in r["chunks"]}
    assert len(uuids) == 3, "two positive conds and the negative, each with caches of its own"
    caplog.clear()
    _sample(tiny_flux, apply_fastattn(tiny_flux.patcher, _plan(tiny_flux, _alternating(tiny_flux, "C"))),
            positive=positive)
    stats = run_stats(caplog)
    if conds == "combined":  # both positives batched with the negative: no single one to share
        assert stats.get("asc_several_conds", 0) > 0 and "cfg_copy" not in stats, stats
        assert any("several positive conds" in r.getMessage() for r in caplog.records)
    assert stats.get("cfg_copy", 0) + stats.get("asc_several_conds", 0) + stats.get("asc_miss", 0) > 0, stats


# --- MultiGPU CFG Split with context windows ------------------------------------------------------


def test_multigpu_split_with_context_windows(tiny_wan, caplog):
    from .test_multigpu import split_across_two_devices

    caplog.set_level(logging.INFO, logger="ditfastattn")
    expected = _sample(tiny_wan, split_across_two_devices(context_windows(tiny_wan.patcher, "standard_static")))
    full = apply_fastattn(split_across_two_devices(context_windows(tiny_wan.patcher, "standard_static")),
                          _plan(tiny_wan, _all_full(tiny_wan)))
    assert torch.equal(_sample(tiny_wan, full), expected)
    caplog.clear()
    model = apply_fastattn(split_across_two_devices(context_windows(tiny_wan.patcher, "standard_static")),
                           _plan(tiny_wan, _alternating(tiny_wan)))
    _sample(tiny_wan, model)
    stats = run_stats(caplog)
    assert stats.get("reuse", 0) > 0 and not any(k.startswith("ast_") for k in stats), stats


def test_counts_per_composition_are_reported(tiny_flux, caplog):
    """The run log states what ran compressed and what ran FULL (the closing note quotes it)."""
    caplog.set_level(logging.INFO, logger="ditfastattn")
    model = apply_fastattn(_slg(tiny_flux.patcher, False), _plan(tiny_flux, _alternating(tiny_flux)))
    _sample(tiny_flux, model)
    stats = run_stats(caplog)
    assert stats.get("reuse", 0) > 0
    by_kind = defaultdict(int)
    for k, v in stats.items():
        by_kind["compressed" if k in ("reuse", "window", "cfg_copy") else "full"] += v
    print(f"skip-layer guidance: {dict(by_kind)}")


# --- calibration sees the same call sites ----------------------------------------------------------


GRAPHS = {
    "static windows": lambda t: context_windows(t.patcher, "standard_static"),
    "uniform windows": lambda t: context_windows(t.patcher, "standard_uniform"),
    "skip-layer guidance": lambda t: _slg(t.patcher, False),
    "skip-layer guidance simple": lambda t: _slg(t.patcher, True),
}


@pytest.mark.parametrize("mode", ["guided", "paper"])
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_calibration_in_the_graph_is_what_apply_reproduces(tiny_wan, tiny_flux, graph, mode, caplog):
    """Calibrate decides per (step, layer) but measures and caches per call site, so Apply with
    its plan, in the same graph, samples exactly the calibration's latent."""
    from ditfastattn_core import Strategy
    from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

    caplog.set_level(logging.INFO, logger="ditfastattn")
    tiny = tiny_wan if "windows" in graph else tiny_flux
    model = GRAPHS[graph](tiny)
    extra = dict(delta=0.3, candidates=(Strategy.AST, Strategy.WA_RS, Strategy.ASC)) if mode == "paper" else {}
    request = CalibrationRequest(seed=0, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal", mode=mode,
                                 **({"delta": 0.2} | extra))
    result = calibrate(model, tiny.positive, tiny.negative, {"samples": tiny.latent}, request)
    plan = Plan.loads(result.plan.dumps())
    assert plan.cost().attention_flops < 1.0, plan.schedule.to_letters()
    import comfy.sample

    noise = comfy.sample.prepare_noise(tiny.latent, 0)
    applied = comfy.sample.sample(apply_fastattn(model, plan), noise, STEPS, 3.0, "euler", "normal", tiny.positive,
                                  tiny.negative, tiny.latent, seed=0, disable_pbar=True)
    assert torch.equal(applied, result.samples), (graph, mode, (applied - result.samples).abs().max())
    if "uniform" in graph and result.notes:
        assert any("context windows shift" in n for n in result.notes) and "context windows shift" in result.summary()


def test_calibration_under_a_step_cache_reads_the_residual_apply_will(tiny_flux, caplog):
    """EasyCache skips whole steps: the plan calls a skipped step FULL, so a later window step
    of Apply finds no residual of that step and runs FULL; calibration must read (and miss)
    the same, not an older residual, or Apply would not reproduce its latent."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    from ditfastattn_core import Strategy
    from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

    caplog.set_level(logging.INFO, logger="ditfastattn")
    steps = 10
    easy = _result(EasyCacheNode.execute(tiny_flux.patcher, 0.05, 0.0, 1.0, False))
    request = CalibrationRequest(seed=0, steps=steps, cfg=3.0, sampler_name="euler", scheduler="normal",
                                 mode="guided", delta=10.0, candidates=(Strategy.WA_RS,))
    result = calibrate(easy, tiny_flux.positive, tiny_flux.negative, {"samples": tiny_flux.latent}, request)
    plan = Plan.loads(result.plan.dumps())
    assert result.stats.get("window", 0) > 0, result.stats
    import comfy.sample

    noise = comfy.sample.prepare_noise(tiny_flux.latent, 0)
    applied = comfy.sample.sample(apply_fastattn(easy, plan), noise, steps, 3.0, "euler", "normal",
                                  tiny_flux.positive, tiny_flux.negative, tiny_flux.latent, seed=0, disable_pbar=True)
    assert torch.equal(applied, result.samples), (applied - result.samples).abs().max()


# --- all-FULL beside every model patch, in both node orders -----------------------------------------


def _perp_neg(tiny, model):
    return _result(_node("comfy_extras.nodes_perpneg", "PerpNeg").execute(model, _empty(tiny), 1.0))


def _easycache(tiny, model):
    return _result(_node("comfy_extras.nodes_easycache", "EasyCacheNode").execute(model, 0.05, 0.0, 1.0, False))


MODEL_PATCHES = {
    "context windows static": ("tiny_wan", lambda tiny, model: context_windows(model, "standard_static")),
    "context windows uniform": ("tiny_wan", lambda tiny, model: context_windows(model, "standard_uniform")),
    "skip-layer guidance": ("tiny_flux", lambda tiny, model: _slg(model, False)),
    "skip-layer guidance simple": ("tiny_flux", lambda tiny, model: _slg(model, True)),
    "PerpNeg": ("tiny_flux", _perp_neg),
    "EasyCache": ("tiny_flux", _easycache),
}


@pytest.mark.parametrize("patch", sorted(MODEL_PATCHES))
@pytest.mark.parametrize("order", ["patch_then_apply", "apply_then_patch"])
def test_all_full_is_bit_exact_beside_model_patches(request, patch, order):
    fixture, add = MODEL_PATCHES[patch]
    tiny = request.getfixturevalue(fixture)
    plan = _plan(tiny, _all_full(tiny))
    expected = _sample(tiny, add(tiny, tiny.patcher))
    if order == "patch_then_apply":
        model = apply_fastattn(add(tiny, tiny.patcher), plan)
    else:
        model = add(tiny, apply_fastattn(tiny.patcher, plan))
    assert torch.equal(_sample(tiny, model), expected)


def test_multigpu_split_with_skip_layer_guidance(tiny_flux, caplog):
    from .test_multigpu import split_across_two_devices

    caplog.set_level(logging.INFO, logger="ditfastattn")
    expected = _sample(tiny_flux, split_across_two_devices(_slg(tiny_flux.patcher, False)))
    full = apply_fastattn(split_across_two_devices(_slg(tiny_flux.patcher, False)), _plan(tiny_flux, _all_full(tiny_flux)))
    assert torch.equal(_sample(tiny_flux, full), expected)
    caplog.clear()
    model = apply_fastattn(split_across_two_devices(_slg(tiny_flux.patcher, False)),
                           _plan(tiny_flux, _alternating(tiny_flux)))
    assert torch.isfinite(_sample(tiny_flux, model)).all()
    stats = run_stats(caplog)
    assert stats.get("reuse", 0) > 0 and not any(k.startswith("ast_") for k in stats), stats


# --- a wrapper that runs the model on part of the batch ---------------------------------------------


def split_batch_in_halves(model):
    """A DIFFUSION_MODEL wrapper that runs the model on each half of the batch, the CPU stand-in
    of raylight's CFG parallel (each rank one branch, transformer_options left listing both)."""
    import comfy.patcher_extension as ext

    def halves(executor, *args, **kwargs):
        n = args[0].shape[0]

        def part(value, rows):
            return value[rows] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n else value

        outs = []
        for rows in (slice(0, n // 2), slice(n // 2, n)):
            outs.append(executor(*(part(a, rows) for a in args), **{k: part(v, rows) for k, v in kwargs.items()}))
        return torch.cat(outs)

    m = model.clone()
    m.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "test_split", halves)
    return m


@pytest.mark.parametrize("samples", [1, 2])
def test_attention_over_rows_split_off_the_model_call_runs_full(tiny_flux, samples, caplog):
    """Two samples split in halves would otherwise look like [cond, uncond] chunks of one
    sample each: ASC would copy one sample onto the other. Rows that are not the call's run FULL."""
    from .tiny import repeat_batch

    caplog.set_level(logging.INFO, logger="ditfastattn")
    latent = repeat_batch(tiny_flux.latent, samples)
    split = split_batch_in_halves(tiny_flux.patcher)
    expected = _sample(tiny_flux, split, latent=latent)
    plan = _plan(tiny_flux, ["F" * 4] + ["C" * 4, "T" * 4, "X" * 4, "W" * 4][: STEPS - 1])
    out = _sample(tiny_flux, apply_fastattn(split, plan), latent=latent)
    assert torch.equal(out, expected), "every compressible call ran FULL"
    stats = run_stats(caplog)
    assert stats.get("rows_unknown", 0) > 0 and not {"cfg_copy", "reuse", "window"} & set(stats), stats
    assert any("a wrapper split the batch" in r.getMessage() for r in caplog.records)
