"""One rank of a raylight run on the CPU: what raylight's RayWorker does on a GPU, in a process.

Run as a script (``python raylight_ranks.py JOB.json RANK``) by ``test_raylight.py``, one
process per rank, joined by torch.distributed over gloo. The process never imports the pack:
the plan arrives as raylight sends it to a Ray worker (a function pickled by value with Ray's
cloudpickle, called as ``model_function_runner`` calls it), so the worker-side loading is the
one a real worker takes.

Real code: raylight 1.5.1's own xfuser loader (``install_minimal_xfuser``), USP injection
(``USPInjectRegistry.inject`` as its ``patch_usp`` ON_LOAD callback), CFG-parallel wrapper
(``CFGParallelInjectRegistry`` as ``patch_cfg``), its attention builder and xfuser 0.7.0's
groups, all-to-all and long-context attention; ComfyUI's sampler. CPU stand-ins, each for a
piece that needs CUDA, and nothing else:
- xfuser's attention modules choose their yunchang implementation by ``torch.cuda.is_available()``
  at import (on a CPU they define ``LongContextAttention = object`` and cannot run): the check
  answers True for those modules while raylight loads them;
- the process group is gloo (raylight's RayWorker asks for NCCL), and xfuser's device name is
  "cpu";
- raylight's ``initialize_xfuser_parallel`` is replaced by the two xfuser calls it makes (its
  ``RankGenerator(...)`` call after them has xfuser < 0.7's signature and raises on 0.7.0).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def load_xfuser_on_cpu(raylight_src: str) -> None:
    sys.path.insert(0, raylight_src)
    available = torch.cuda.is_available

    def cuda_for_xfuser_attention() -> bool:
        frame = sys._getframe(1)
        name = frame.f_globals.get("__name__", "")
        return name.startswith("xfuser.core.long_ctx_attention") or frame.f_code.co_name == "check_long_ctx_attn"

    torch.cuda.is_available = cuda_for_xfuser_attention
    try:
        import raylight  # noqa: F401  (its install_minimal_xfuser loads xfuser's real modules)
    finally:
        torch.cuda.is_available = available
    envs = sys.modules["xfuser.envs"]
    envs.get_torch_distributed_backend = lambda: "gloo"
    envs.get_device_name = lambda: "cpu"


def init_groups(rank: int, job: dict) -> None:
    """RayWorker.__init__: the process group, then (raylight's xDiT modes) xfuser's groups; data
    parallel ("dp") initialises no xfuser groups, as raylight's workers do."""
    import raylight.distributed_modules.attention as xfuser_attn
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel

    dist.init_process_group("gloo", rank=rank, world_size=job["world"], init_method=f"tcp://127.0.0.1:{job['port']}")
    if job.get("dp"):
        return
    xfuser_attn.set_attn_type("TORCH_MATH")
    xfuser_attn.set_sync_ulysses(False)
    init_distributed_environment(rank=rank, world_size=job["world"])
    ulysses, ring = job["ulysses"], job.get("ring", 1)
    initialize_model_parallel(data_parallel_degree=1, sequence_parallel_degree=ulysses * ring,
                              classifier_free_guidance_degree=job["cfg_degree"], ring_degree=ring,
                              ulysses_degree=ulysses, pipeline_parallel_degree=1)


class Stats(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(job_path: str, rank: int) -> None:
    job = json.loads(Path(job_path).read_text())
    sys.path.insert(0, job["comfyui"])
    from comfy.cli_args import args

    args.cpu = True
    load_xfuser_on_cpu(job["raylight"])
    init_groups(rank, job)

    import comfy.patcher_extension as ext
    import comfy.sample
    import tiny
    from raylight.distributed_modules.cfg import CFGParallelInjectRegistry
    from raylight.distributed_modules.usp import USPInjectRegistry

    model = getattr(tiny, job["family"])()
    if job.get("text_len"):  # a prompt whose token count does not divide by the ranks
        model.positive[0][0] = model.positive[0][0][:, :job["text_len"]]
        model.negative[0][0] = model.negative[0][0][:, :job["text_len"]]
    patcher = model.patcher
    if job["ulysses"] * job.get("ring", 1) > 1:  # RayWorker.patch_usp
        patcher.add_callback(ext.CallbacksMP.ON_LOAD, USPInjectRegistry.inject)
    if job["cfg_degree"] > 1:  # RayWorker.patch_cfg
        patcher.add_wrapper(ext.WrappersMP.DIFFUSION_MODEL, CFGParallelInjectRegistry.inject(patcher))
    if job.get("plan") is not None:  # RayWorker.model_function_runner(fn, *args)
        from ray import cloudpickle

        install = cloudpickle.loads(Path(job["payload"]).read_bytes())
        patcher = install(patcher, job["pack_root"], job["plan"], job["options"])
    stats = Stats()
    logging.getLogger("ditfastattn").addHandler(stats)
    logging.getLogger("ditfastattn").setLevel(logging.INFO)
    latent = model.latent
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latent.shape, generator=g)
    with torch.no_grad():
        out = comfy.sample.sample(patcher, noise, job["steps"], job["cfg"], "euler", "normal", model.positive,
                                  model.negative, latent, seed=0, disable_pbar=True)
    torch.save({"samples": out, "log": stats.lines}, Path(job["out"]) / f"rank{rank}.pt")
    dist.destroy_process_group()


class WorkerStandIn:
    """A Ray actor with the methods of raylight's RayWorker that Apply FastAttn (Ray) calls
    (``model_function_runner``, ``model_function_runner_get_values``, ``get_parallel_dict``) on
    a tiny CPU model (a RayWorker needs CUDA), plus ``sample`` as its samplers do: Ray's own
    transport carries the plan to a process that never loaded the pack."""

    def __init__(self, comfyui: str, family: str, parallel_dict: dict) -> None:
        sys.path.insert(0, comfyui)
        from comfy.cli_args import args

        args.cpu = True
        import tiny

        self.tiny = getattr(tiny, family)()
        self.model = self.tiny.patcher
        self.parallel_dict = parallel_dict
        self.stats = Stats()
        logging.getLogger("ditfastattn").addHandler(self.stats)
        logging.getLogger("ditfastattn").setLevel(logging.INFO)

    def model_function_runner(self, fn, *args, **kwargs):
        self.model = fn(self.model, *args, **kwargs)

    def model_function_runner_get_values(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)

    def get_parallel_dict(self) -> dict:
        return self.parallel_dict

    def loaded_pack(self) -> bool:
        """Whether this process has the pack's core loaded (only a plan sent here loads it)."""
        return "ditfastattn_core" in sys.modules

    def sample(self, steps: int, cfg: float) -> dict:
        import comfy.sample

        latent = self.tiny.latent
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        self.stats.lines.clear()
        with torch.no_grad():
            out = comfy.sample.sample(self.model, noise, steps, cfg, "euler", "normal", self.tiny.positive,
                                      self.tiny.negative, latent, seed=0, disable_pbar=True)
        return {"samples": out, "log": list(self.stats.lines)}


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
