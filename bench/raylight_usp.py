"""One GPU against raylight's sequence parallelism (Ulysses), with and without a FastAttn plan.

Given N >= 2 CUDA devices, a ComfyUI tree ($COMFYUI_PATH or the one above the pack) and raylight
(--raylight, its ``src`` folder; xfuser and yunchang installed): a Flux-shaped model with random
weights (Flux's width: 3072 hidden, 24 heads x 128; reduced depth) samples a 1024x1024 image
(4096 image + 256 text tokens) with CFG, as raylight's workers do it (its USP injection on each
rank's model, one process per GPU, NCCL), and each of the three is timed in the same run:

    one GPU, no plan   |   N GPUs USP, no plan   |   N GPUs USP, plan (W after a FULL first step)

Medians of --repeats samplings after one warm-up; ratios against one GPU. Without CUDA devices it
prints one line and exits 0.

    python bench/raylight_usp.py --raylight ~/ComfyUI/custom_nodes/raylight/src [--gpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 8
CFG = 3.5


def flux_config(depth: int) -> dict:
    return {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": depth,
            "depth_single_blocks": 2 * depth, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
            "qkv_bias": True}


def rank_main(job: dict, rank: int) -> None:
    """One GPU of the run (rank 0 of 1: the one-GPU baseline)."""
    from comfy_setup import import_comfy, random_weights

    import_comfy("cuda")
    torch.cuda.set_device(rank)
    world, usp = job["world"], job["world"] > 1
    import comfy.patcher_extension as ext
    import comfy.sample
    import comfy.supported_models

    if usp:
        sys.path.insert(0, job["raylight"])
        import raylight  # noqa: F401  (raylight's xfuser loader)
        import raylight.distributed_modules.attention as xfuser_attn
        import torch.distributed as dist
        from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel

        dist.init_process_group("nccl", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{job['port']}")
        xfuser_attn.set_attn_type("TORCH_FLASH")
        xfuser_attn.set_sync_ulysses(False)
        init_distributed_environment(rank=rank, world_size=world)
        initialize_model_parallel(data_parallel_degree=1, sequence_parallel_degree=world,
                                  classifier_free_guidance_degree=1, ring_degree=1, ulysses_degree=world,
                                  pipeline_parallel_degree=1)
        from raylight.distributed_modules.usp import USPInjectRegistry

    config = comfy.supported_models.Flux(flux_config(job["depth"]))
    model = random_weights(config)
    model.model.to(torch.bfloat16)
    if usp:
        model.add_callback(ext.CallbacksMP.ON_LOAD, USPInjectRegistry.inject)
    if job["plan"]:
        from ditfastattn_core.comfy_bridge import apply_fastattn, detect_family, layer_count
        from ditfastattn_core.plan import Plan
        from ditfastattn_core.schedule import Schedule

        layers = layer_count(model.model, detect_family(model.model))
        rows = ["F" * layers] + ["W" * layers] * (STEPS - 1)
        plan = Plan(schedule=Schedule.from_letters(rows), family="flux",
                    sigmas=tuple(float(STEPS - i) for i in range(STEPS + 1)), cfg=CFG)
        model = apply_fastattn(model, plan, step_mode="normalised")
    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, 128, 128)
    cond = [[torch.randn(1, 256, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    neg = [[torch.randn(1, 256, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    noise = torch.randn(latent.shape, generator=g)
    times = []
    for _ in range(job["repeats"] + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            comfy.sample.sample(model, noise, STEPS, CFG, "euler", "simple", cond, neg, latent, seed=0,
                                disable_pbar=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(job["out"]).write_text(json.dumps(statistics.median(times[1:])))


def launch(job: dict, workdir: Path) -> float:
    job = {**job, "out": str(workdir / f"t{job['world']}{int(job['plan'])}.json")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        job["port"] = s.getsockname()[1]
    path = workdir / "job.json"
    path.write_text(json.dumps(job))
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--job", str(path)])
             for r in range(job["world"])]
    if any(p.wait() for p in procs):
        sys.exit("a rank failed (see above)")
    return json.loads(Path(job["out"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raylight", help="raylight's src folder (holds the raylight package)")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4, help="double blocks (single blocks: twice as many)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--job")
    a = parser.parse_args()
    if a.rank is not None:
        rank_main(json.loads(Path(a.job).read_text()), a.rank)
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < max(2, a.gpus):
        print(f"bench/raylight_usp.py needs {max(2, a.gpus)} CUDA devices (found {found}): nothing to time here")
        return
    if not a.raylight or not (Path(a.raylight) / "raylight").is_dir():
        sys.exit("--raylight must name raylight's src folder (the one holding the raylight package)")
    base = {"raylight": str(Path(a.raylight).resolve()), "depth": a.depth, "repeats": a.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        one = launch({**base, "world": 1, "plan": False}, work)
        usp = launch({**base, "world": a.gpus, "plan": False}, work)
        usp_plan = launch({**base, "world": a.gpus, "plan": True}, work)
    print(f"Flux-shaped, depth {a.depth}+{2 * a.depth}, 1024x1024, {STEPS} steps, CFG {CFG}, bf16; medians of "
          f"{a.repeats}")
    print("| run | seconds | vs one GPU |\n|---|---|---|")
    for name, t in (("one GPU", one), (f"{a.gpus} GPUs, raylight USP", usp),
                    (f"{a.gpus} GPUs, raylight USP + FastAttn (W after a FULL step)", usp_plan)):
        print(f"| {name} | {t:.2f} | {one / t:.2f}x |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
