"""FastAttn inside raylight: sequence parallel (Ulysses) and CFG parallel, several processes.

Each rank is a process (``raylight_ranks.py``: raylight's and xfuser's real code on the CPU, the
stand-ins it names), joined over gloo; the plan reaches it as Apply FastAttn (Ray) sends it.
The oracle is single-device sampling in this process: the same model, noise and plan.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ditfastattn_core.state import CachePlacement

from .test_apply import STEPS, plan_for, sample, uniform
from .tiny import BUILDERS

ROOT = Path(__file__).resolve().parents[2]
RAYLIGHT = Path(os.environ.get("RAYLIGHT_PATH", ROOT.parent / "shared" / "raylight" / "1.5.1")) / "src"
RANKS = Path(__file__).with_name("raylight_ranks.py")
CFG = 3.0

missing = [name for name in ("xfuser", "yunchang", "ray") if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.skipif(not (RAYLIGHT / "raylight").is_dir(), reason=f"no raylight at {RAYLIGHT} (set RAYLIGHT_PATH)"),
    pytest.mark.skipif(bool(missing), reason=f"raylight's packages are not installed: {', '.join(missing)}"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, family: str, *, ulysses: int = 1, cfg_degree: int = 1, plan=None) -> list[dict]:
    """Sample on ``ulysses * cfg_degree`` ranks; per rank its samples and its FastAttn log."""
    from ray import cloudpickle

    from ditfastattn_core.comfy_bridge import raylight_worker

    world = ulysses * cfg_degree
    out = Path(tempfile.mkdtemp(prefix=f"{family}-u{ulysses}-c{cfg_degree}-", dir=tmp_path))
    payload = out / "install.pkl"
    cloudpickle.register_pickle_by_value(raylight_worker)
    try:
        payload.write_bytes(cloudpickle.dumps(raylight_worker.install_plan))
    finally:
        cloudpickle.unregister_pickle_by_value(raylight_worker)
    job = {"comfyui": os.environ["COMFYUI_PATH"], "raylight": str(RAYLIGHT), "world": world, "port": free_port(),
           "ulysses": ulysses, "cfg_degree": cfg_degree, "family": family, "steps": STEPS, "cfg": CFG,
           "plan": None if plan is None else plan.to_json(), "payload": str(payload), "pack_root": str(ROOT),
           "options": {"kernel": "auto", "step_mode": "strict", "cache_placement": CachePlacement.DEVICE.value}, "out": str(out)}
    (out / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    procs = [subprocess.Popen([sys.executable, str(RANKS), str(out / "job.json"), str(r)], cwd=RANKS.parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def stats(result: dict) -> dict[str, int]:
    lines = [line for line in result["log"] if line.startswith("FastAttn run: ")]
    assert lines, f"the rank logged no FastAttn run: {result['log']}"
    return {k: int(v) for k, v in (p.rsplit(" ", 1) for p in lines[-1][len("FastAttn run: "):].split(", "))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Equal up to the rounding of attention computed on gathered head shards."""
    return float((a - b).norm() / b.norm()) < tol


FAMILIES = ["flux", "wan"]  # raylight's USP families the pack maps (and xfuser runs on the CPU)
ACTIONS = {"W": "window", "T": "reuse", "C": "cfg_copy", "X": "window"}
WINDOWED = ("W", "X")


@pytest.mark.parametrize("family", FAMILIES)
def test_all_full_plan_is_bit_identical_to_raylight_without_the_pack(tmp_path, family):
    tiny = BUILDERS[family]()
    plain = run_ranks(tmp_path, family, ulysses=2)
    full = run_ranks(tmp_path, family, ulysses=2, plan=plan_for(tiny, uniform(tiny, "F")))
    for a, b in zip(plain, full, strict=True):
        assert torch.equal(a["samples"], b["samples"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("letter", ["W", "T", "C", "X"])
def test_each_strategy_compresses_on_every_rank_as_on_one_gpu(tmp_path, family, letter):
    tiny = BUILDERS[family]()
    plan = plan_for(tiny, uniform(tiny, letter))
    single = sample(tiny, _apply(tiny, plan), cfg=CFG)
    ranks = run_ranks(tmp_path, family, ulysses=2, plan=plan)
    plain = run_ranks(tmp_path, family, ulysses=2)
    effect = rel(plain[0]["samples"], single)  # how far the plan moves the samples (tiny random models: little)
    for rank, result in enumerate(ranks):
        counts = stats(result)
        assert counts.get(ACTIONS[letter], 0) > 0, counts
        assert not any(k.endswith("_miss") or k.startswith("usp_") for k in counts), counts
        # the window lands on the image tokens of the gathered sequence: the ranks sample what
        # one GPU samples with the plan, 20x closer than the plan's own effect (Flux's double
        # blocks windowed on the rank-ordered tokens: only about 2x closer)
        print(f"{family} {letter} rank {rank}: {counts}; off one GPU {rel(result['samples'], single):.1e}, "
              f"plan's effect {effect:.1e}")
        assert effect > 0, "the plan changed nothing"
        assert close(result["samples"], single), (family, letter, rank)
        if letter in WINDOWED:
            assert rel(result["samples"], single) < effect / 20, (family, letter, rank)


def test_cfg_parallel_keeps_each_branch_on_its_rank(tmp_path):
    tiny = BUILDERS["flux"]()
    for letter in ("W", "T"):
        plan = plan_for(tiny, uniform(tiny, letter))
        single = sample(tiny, _apply(tiny, plan), cfg=CFG)
        ranks = run_ranks(tmp_path, "flux", cfg_degree=2, plan=plan)
        for result in ranks:
            counts = stats(result)
            assert counts.get(ACTIONS[letter], 0) > 0 and "rows_unknown" not in counts, counts
            assert close(result["samples"], single)


def test_cfg_parallel_runs_asc_full_on_the_unconditional_rank_and_says_so(tmp_path):
    tiny = BUILDERS["flux"]()
    full = sample(tiny, _apply(tiny, plan_for(tiny, uniform(tiny, "F"))), cfg=CFG)
    ranks = run_ranks(tmp_path, "flux", cfg_degree=2, plan=plan_for(tiny, uniform(tiny, "C")))
    counted = [stats(r).get("asc_cfg_parallel", 0) for r in ranks]
    assert sorted(counted)[0] == 0 and sorted(counted)[1] > 0, counted  # one rank holds the negative
    negative = ranks[counted.index(max(counted))]
    assert any("raylight's CFG parallel" in line for line in negative["log"])
    for result in ranks:
        assert "cfg_copy" not in stats(result)
        assert close(result["samples"], full)


def _apply(tiny, plan):
    from ditfastattn_core.comfy_bridge import apply_fastattn

    return apply_fastattn(tiny.patcher, plan)
