"""The pack's nodes as ComfyUI loads them: calibrate -> save -> load -> apply -> sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .tiny import flux

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def plans_dir(tmp_path, monkeypatch):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["fastattn_plans"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "fastattn_plans", ([str(tmp_path), *paths[1:]], exts))
    folder_paths.filename_list_cache.pop("fastattn_plans", None)
    return tmp_path


def test_calibrate_save_load_apply_sample(pack, plans_dir):
    import comfy.sample

    tiny = flux()
    latent = {"samples": tiny.latent}
    plan, out_latent, summary = pack["DiTFastAttn_Calibrate"].execute(
        tiny.patcher, tiny.positive, tiny.negative, latent, 0, 4, 3.0, "euler", "normal", 1.0,
        0.2, "fast", True, True, True, True, "band 1/8 (paper)", 1, "auto",
    ).result
    assert "attention FLOPs" in summary and out_latent["samples"].shape == tiny.latent.shape
    saved = pack["DiTFastAttn_SavePlan"].execute(plan, "tiny flux", False)
    assert Path(saved.result[0]) == plans_dir / "tiny flux.json"
    assert "ditfastattn_plan" in saved.ui
    with pytest.raises(FileExistsError):
        pack["DiTFastAttn_SavePlan"].execute(plan, "tiny flux", False)
    loaded, text = pack["DiTFastAttn_LoadPlan"].execute("tiny flux.json").result
    assert loaded == plan and "flux" in text
    embedded, _ = pack["DiTFastAttn_LoadPlan"].execute("(none)", plan.dumps(indent=None)).result
    assert embedded == plan
    model = pack["DiTFastAttn_Apply"].execute(tiny.patcher, loaded, "auto", "strict").result[0]
    noise = comfy.sample.prepare_noise(tiny.latent, 0)
    again = comfy.sample.sample(model, noise, 4, 3.0, "euler", "normal", tiny.positive, tiny.negative,
                                tiny.latent, seed=0, disable_pbar=True)
    torch.testing.assert_close(again, out_latent["samples"], rtol=1e-4, atol=1e-4)


def test_save_refuses_bad_names(pack):
    assert pack["DiTFastAttn_SavePlan"].validate_inputs(name="../escape") != True  # noqa: E712
    assert pack["DiTFastAttn_SavePlan"].validate_inputs(name="fine name") is True


def test_load_refuses_a_bad_embedded_plan(pack):
    # PlanError is a ValueError (the pack's own copy of the class, as ComfyUI loaded it)
    with pytest.raises(ValueError, match="not a FastAttn plan"):
        pack["DiTFastAttn_LoadPlan"].execute("(none)", json.dumps({"format": "pickle"}))


def test_load_lists_the_packs_shipped_plans(pack):
    import folder_paths

    assert str(ROOT / "plans") in folder_paths.get_folder_paths("fastattn_plans")
