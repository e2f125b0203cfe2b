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

from .test_apply import STEPS, parse_run_stats, plan_for, sample, uniform
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


def run_ranks(tmp_path: Path, family: str, *, ulysses: int = 1, cfg_degree: int = 1, plan=None, ring: int = 1,
              dp: int = 1, text_len: int | None = None) -> list[dict]:
    """Sample on ``ulysses * ring * cfg_degree * dp`` ranks; per rank its samples and FastAttn log."""
    from ray import cloudpickle

    from ditfastattn_core.comfy_bridge import raylight_worker

    world = ulysses * ring * cfg_degree * dp
    out = Path(tempfile.mkdtemp(prefix=f"{family}-u{ulysses}-c{cfg_degree}-", dir=tmp_path))
    payload = out / "install.pkl"
    cloudpickle.register_pickle_by_value(raylight_worker)
    try:
        payload.write_bytes(cloudpickle.dumps(raylight_worker.install_plan))
    finally:
        cloudpickle.unregister_pickle_by_value(raylight_worker)
    job = {"comfyui": os.environ["COMFYUI_PATH"], "raylight": str(RAYLIGHT), "world": world, "port": free_port(),
           "ulysses": ulysses, "ring": ring, "cfg_degree": cfg_degree, "dp": dp > 1, "text_len": text_len,
           "family": family, "steps": STEPS, "cfg": CFG,
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
    return parse_run_stats(result["log"])


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


def test_usp_and_cfg_parallel_together(tmp_path):
    tiny = BUILDERS["flux"]()
    plan = plan_for(tiny, uniform(tiny, "W"))
    single = sample(tiny, _apply(tiny, plan), cfg=CFG)
    for result in run_ranks(tmp_path, "flux", ulysses=2, cfg_degree=2, plan=plan):
        counts = stats(result)
        assert counts.get("window", 0) > 0 and "rows_unknown" not in counts and "usp_unsplit" not in counts, counts
        assert close(result["samples"], single)


def test_data_parallel_runs_the_plan_on_each_worker(tmp_path):
    tiny = BUILDERS["wan"]()
    plan = plan_for(tiny, uniform(tiny, "X"))
    single = sample(tiny, _apply(tiny, plan), cfg=CFG)
    for result in run_ranks(tmp_path, "wan", dp=2, plan=plan):
        counts = stats(result)
        assert counts.get("window", 0) > 0 and counts.get("cfg_copy", 0) > 0, counts
        assert close(result["samples"], single, 1e-6)


def test_ring_degree_runs_full_and_says_so(tmp_path):
    tiny = BUILDERS["flux"]()
    plain = run_ranks(tmp_path, "flux", ring=2)
    ranks = run_ranks(tmp_path, "flux", ring=2, plan=plan_for(tiny, uniform(tiny, "W")))
    for a, b in zip(plain, ranks, strict=True):
        assert stats(b) == {"parallel_full": 1}
        assert any("ring degree 2" in line and "the run is FULL" in line for line in b["log"])
        assert torch.equal(a["samples"], b["samples"])


def test_a_padded_split_runs_full_and_says_so(tmp_path):
    """7 text tokens over 2 GPUs: raylight pads the text (and the joint sequence), so no layer's
    tokens are where the window expects them: FULL, said once, bit-exact to raylight alone."""
    tiny = BUILDERS["flux"]()
    plain = run_ranks(tmp_path, "flux", ulysses=2, text_len=7)
    ranks = run_ranks(tmp_path, "flux", ulysses=2, text_len=7, plan=plan_for(tiny, uniform(tiny, "W")))
    for a, b in zip(plain, ranks, strict=True):
        counts = stats(b)
        assert counts.get("usp_unsplit", 0) > 0 and "window" not in counts, counts
        assert sum("divide by the number of GPUs" in line for line in b["log"]) == 1
        assert torch.equal(a["samples"], b["samples"])


@pytest.fixture
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(RANKS.parent), "OMP_NUM_THREADS": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()


def test_apply_fastattn_ray_sends_the_plan_through_ray(ray_local, pack):
    """The node on real Ray actors (raylight's RayWorker methods on a CPU stand-in): the plan is
    installed in processes that never loaded the pack, refused there when it does not fit."""
    sys.path.insert(0, str(RANKS.parent))
    import raylight_ranks

    ray = ray_local
    tiny = BUILDERS["flux"]()
    actor = ray.remote(raylight_ranks.WorkerStandIn)
    dp = {"is_xdit": False, "is_fsdp": False, "global_world_size": 2}
    workers = [actor.remote(os.environ["COMFYUI_PATH"], "flux", dp) for _ in range(2)]
    assert not any(ray.get([w.loaded_pack.remote() for w in workers]))
    node = pack["DiTFastAttn_ApplyRay"]
    plan = plan_for(tiny, uniform(tiny, "W"))
    out = node.execute({"workers": workers}, plan, "auto", "strict")
    assert out.result[0] == {"workers": workers}
    summary = out.ui["ditfastattn_plan"][0]["summary"]
    assert "raylight: data parallel: each GPU runs the plan as on one GPU" in summary, summary
    single = sample(tiny, _apply(tiny, plan), cfg=CFG)
    for result in ray.get([w.sample.remote(STEPS, CFG) for w in workers]):
        assert stats(result).get("window", 0) > 0
        assert close(result["samples"], single, 1e-6)
    wan = BUILDERS["wan"]()
    with pytest.raises(ValueError, match="FastAttn on the raylight workers: .*wan"):
        node.execute({"workers": workers}, plan_for(wan, uniform(wan, "W")), "auto", "strict")


def test_the_node_says_what_each_raylight_mode_does():
    from ditfastattn_core.comfy_bridge.raylight import parallel_summary

    usp = {"is_xdit": True, "ulysses_degree": 4, "ring_degree": 1, "cfg_degree": 1}
    assert "every GPU follows the plan" in parallel_summary(usp, "wan")
    assert "FULL for qwen_image" in parallel_summary(usp, "qwen_image")
    assert "ring degree 2: FULL" in parallel_summary({**usp, "ring_degree": 2}, "flux")
    assert "ASC runs FULL" in parallel_summary({**usp, "cfg_degree": 2}, "flux")
    assert "FSDP: each GPU" in parallel_summary({"is_fsdp": True}, "flux")
    assert "PipeFusion" in parallel_summary({"pipefusion_enabled": True}, "flux")
