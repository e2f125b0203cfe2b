"""How a run on a raylight worker decides what it can compress (``raylight.open_route``), and
the route into xfuser's attention class, on stand-ins of xfuser's modules (no xfuser needed)."""

from __future__ import annotations

import sys
import types

import pytest

from ditfastattn_core.comfy_bridge import raylight
from ditfastattn_core.comfy_bridge.raylight import ParallelGroups, SequenceRoute


class FakeRun:
    def __init__(self, family: str = "flux") -> None:
        self.geometry = types.SimpleNamespace(family=family, label=family, block_offsets={}, layers=0)
        self.parallel = None
        self.full: list[str] = []
        self.reports: dict[str, str] = {}
        self.state = types.SimpleNamespace(counts={}, count=lambda what, n=1: self.state.counts.update(
            {what: self.state.counts.get(what, 0) + n}))

    def run_full(self, reason: str) -> None:
        self.full.append(reason)

    def report(self, key: str, message: str) -> None:
        self.reports.setdefault(key, message)


@pytest.mark.parametrize("groups,family,full", [
    (None, "flux", None),
    (ParallelGroups(cfg_world=2, cfg_rank=1), "flux", None),
    (ParallelGroups(sp_world=4, ring_world=2), "flux", "ring degree 2"),
    (ParallelGroups(sp_world=2), "qwen_image", "flux, wan only"),
    (ParallelGroups(pp_world=2), "flux", "PipeFusion"),
])
def test_a_run_says_once_when_raylight_leaves_it_nothing_to_compress(monkeypatch, groups, family, full):
    monkeypatch.setattr(raylight, "parallel_groups", lambda: groups)
    run = FakeRun(family)
    assert raylight.open_route(run, None, None) is None
    assert run.parallel == groups
    if full is None:
        assert run.full == []
    else:
        assert len(run.full) == 1 and full in run.full[0]


def test_usp_without_xfusers_attention_class_runs_full(monkeypatch):
    monkeypatch.setattr(raylight, "parallel_groups", lambda: ParallelGroups(sp_world=2))
    monkeypatch.delitem(sys.modules, raylight.LONG_CONTEXT_ATTENTION, raising=False)
    run = FakeRun("wan")
    assert raylight.open_route(run, None, None) is None
    assert "not loaded" in run.full[0]


class LongContextAttention:
    """xfuser's class as far as the route cares: ``ring_attn_fn`` set per instance in __init__."""

    def __init__(self) -> None:
        self.ring_attn_fn = lambda q, k, v, **kw: ("raw", q)


def test_the_route_leaves_xfuser_alone_outside_a_marked_layer(monkeypatch):
    module = types.ModuleType(raylight.LONG_CONTEXT_ATTENTION)
    module.xFuserLongContextAttention = type("xFuserLongContextAttention", (LongContextAttention,), {})
    monkeypatch.setitem(sys.modules, raylight.LONG_CONTEXT_ATTENTION, module)
    before = module.xFuserLongContextAttention()  # created before the route, as raylight's are
    assert raylight.install_ring_route() and raylight.install_ring_route()  # idempotent
    after = module.xFuserLongContextAttention()
    for attn in (before, after):
        assert attn.ring_attn_fn(1, 2, 3) == ("raw", 1)
    route = SequenceRoute({}, 2)
    seen = []
    route.attention = lambda raw, call, block, *args, **kw: seen.append((call, block, raw(*args, **kw)))
    monkeypatch.setattr(raylight._MARKS, "current", (route, "call", {"block_index": 3}))
    before.ring_attn_fn(1, 2, 3)
    assert seen == [("call", {"block_index": 3}, ("raw", 1))]


def test_a_route_that_never_ran_says_so():
    run = FakeRun()
    route = SequenceRoute({}, 2)
    route.marked = 4
    route.close(run)
    assert run.state.counts == {"usp_unrouted": 1} and "none of their attention" in run.reports["usp_unrouted"]
