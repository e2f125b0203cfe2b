"""MultiGPU CFG Split: cond and uncond run at once, in one thread per device.

CPU stand-in: the devices are cpu:0 and cpu:1 (distinct keys, one memory), with ComfyUI's own
``_calc_cond_batch_multigpu`` and its ``MultiGPUThreadPool`` driven through a CALC_COND_BATCH
wrapper, exactly as the MultiGPU CFG Split node's clones make ComfyUI do on several GPUs."""

from __future__ import annotations

import logging

import pytest
import torch

from .test_apply import plan_for, run_stats, sample, uniform
from .tiny import BUILDERS

DEVICES = (torch.device("cpu", 0), torch.device("cpu", 1))


def split_across_two_devices(model):
    import comfy.patcher_extension as ext
    import comfy.samplers

    if not hasattr(comfy.samplers, "_calc_cond_batch_multigpu"):
        pytest.skip("this ComfyUI has no MultiGPU CFG Split")
    import comfy.multigpu

    pool = comfy.multigpu.MultiGPUThreadPool(list(DEVICES))

    def multigpu(executor, model_, conds, x_in, timestep, model_options):
        options = {**model_options, "multigpu_clones": {d: model for d in DEVICES}, "multigpu_thread_pool": pool}
        return executor(model_, conds, x_in, timestep, options)

    m = model.clone()
    m.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, "test_multigpu", multigpu)
    return m


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of running cond and uncond unbatched (relative norm)."""
    return float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("name", ["flux", "pixart"])
@pytest.mark.parametrize("letter,computes", [("F", "dense"), ("W", "window"), ("C", "asc_miss"), ("T", "reuse")])
def test_each_device_keeps_its_own_caches(name, letter, computes, caplog):
    from ditfastattn_core.comfy_bridge import apply_fastattn

    caplog.set_level(logging.INFO, logger="ditfastattn")
    tiny = BUILDERS[name]()
    patched = apply_fastattn(tiny.patcher, plan_for(tiny, uniform(tiny, letter)))
    single = sample(tiny, patched)
    caplog.clear()
    out = sample(tiny, split_across_two_devices(patched))
    assert any("MultiGPU CFG Split" in r.getMessage() for r in caplog.records), "the split path was not taken"
    if letter == "F":  # the split runs cond and uncond unbatched: equal up to batching's rounding
        assert close(out, single)
        return
    stats = run_stats(caplog)
    assert stats.get("residual_miss", 0) == 0 and stats.get("ast_miss", 0) == 0, stats
    if letter == "C":
        # the branches are on different devices: no copy across devices, uncond computes itself
        assert stats.get("cfg_copy", 0) == 0 and stats.get(computes, 0) > 0, stats
    else:
        assert stats.get(computes, 0) > 0, stats
        assert close(out, single)


def test_calibration_refuses_a_split_model():
    import comfy.model_patcher

    from ditfastattn_core.comfy_bridge.calibration import CalibrationRequest, calibrate

    tiny = BUILDERS["flux"]()
    model = tiny.patcher.clone()
    extra = comfy.model_patcher.ModelPatcher(tiny.patcher.model, DEVICES[1], DEVICES[1])
    model.set_additional_models("multigpu", [extra])
    with pytest.raises(ValueError, match="connect the model before MultiGPU CFG Split"):
        calibrate(model, tiny.positive, tiny.negative, {"samples": tiny.latent},
                  CalibrationRequest(seed=0, steps=2, cfg=2.0, sampler_name="euler", scheduler="normal"))
